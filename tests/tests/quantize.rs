//! `switchyard quantize` and `switchyard perplexity` as a user runs them: a quantized checkpoint
//! written, reloaded and scored, and bad inputs refused with clear errors.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use serde_json::Value;
use switchyard_tests::{fixtures, run, run_ok};

#[test]
fn a_quantized_checkpoint_is_written_loaded_and_scored() {
    let trained = fixtures().join("tiny-mixtral-trained");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q8");
    let said = run_ok(&[
        "quantize",
        "--model",
        trained.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        "q8_0",
    ]);
    assert!(said.contains("96 of 127 tensors in q8_0"), "{said}");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["format"], "q8_0");
    assert!(out.join("tokenizer.json").exists());
    // The saved checkpoint generates what quantizing at load generates.
    let gen = |model: &str, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "The function returns",
        ];
        args.extend_from_slice(&["--max-tokens", "12"]);
        args.extend_from_slice(extra);
        run_ok(&args)
    };
    assert_eq!(
        gen(out.to_str().unwrap(), &[]),
        gen(trained.to_str().unwrap(), &["--quantize", "q8_0"])
    );
    // Perplexity of the shipped text, against the original.
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/perplexity.txt");
    let report = run_ok(&[
        "perplexity",
        "--model",
        trained.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "--ctx",
        "128",
        "--chunks",
        "8",
        "--quantize",
        "q8_0",
        "--kl-divergence",
        "--json",
    ]);
    let r: Value = serde_json::from_str(&report).unwrap();
    assert_eq!(r["quantization"], "q8_0");
    assert_eq!(r["tokens_scored"], 8 * 63);
    let ppl = r["perplexity"].as_f64().unwrap();
    assert!(ppl > 2.0 && ppl < 200.0, "{r}");
    assert!(r["kl_divergence"].as_f64().unwrap() >= 0.0, "{r}");
    assert!(r["top1_agreement"].as_f64().unwrap() > 0.9, "{r}");
}

#[test]
fn bad_quantization_requests_get_clear_errors() {
    let trained = fixtures().join("tiny-mixtral-trained");
    let t = trained.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["quantize", "--model", t, "--out", t, "--format", "q4_0"],
            "must differ",
        ),
        (
            &[
                "quantize", "--model", t, "--out", "/tmp/x", "--format", "q5_k",
            ],
            "q5_k",
        ),
        (
            &[
                "generate",
                "--model",
                t,
                "--prompt",
                "a",
                "--quantize-attention",
            ],
            "--quantize",
        ),
        (
            &["perplexity", "--model", t, "--file", t, "--kl-divergence"],
            "reading",
        ),
    ];
    for (args, want) in cases {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
