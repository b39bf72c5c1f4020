//! `switchyard plan` and `bench --calibrate` through the real binary: the placement and memory
//! a user gets for Mixtral-8x7B on commodity hosts, clear refusals where it does not fit, and a
//! calibration measured here that the planner then predicts from.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use serde_json::Value;
use switchyard_tests::{fixtures, run, run_ok};

fn plan_json(args: &[&str]) -> Value {
    serde_json::from_str(&run_ok(&[&["plan", "--json"], args].concat())).unwrap()
}

#[test]
fn mixtral_on_four_24_gib_hosts_holds_two_experts_each() {
    let v = plan_json(&["--preset", "mixtral-8x7b", "--hosts", "4x24GiB:8c:40GBps"]);
    let p = &v["plan"];
    let placement = p["placement"].as_array().unwrap();
    assert_eq!(placement.len(), 4);
    let mut all: Vec<u64> = placement
        .iter()
        .flat_map(|w| w.as_array().unwrap().iter().map(|e| e.as_u64().unwrap()))
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..8).collect::<Vec<u64>>());
    for w in p["worker_bytes"].as_array().unwrap() {
        assert!(w.as_u64().unwrap() < 24 << 30);
    }
    for rate in ["batch1", "at_streams"] {
        let t = p[rate]["tok_s"].as_f64().unwrap();
        assert!(t.is_finite() && t > 0.0, "{rate}: {t}");
    }
    assert!(p["at_streams"]["tok_s"].as_f64() > p["batch1"]["tok_s"].as_f64());
    // How many coordinators these workers feed, and their rate: never below one's.
    let fill = &p["fill"];
    assert!(fill["coordinators"].as_u64().unwrap() >= 1);
    assert!(fill["tok_s"].as_f64() >= p["at_streams"]["tok_s"].as_f64());
}

#[test]
fn a_model_too_large_for_the_hosts_is_refused_with_what_would_fit() {
    let o = run(&["plan", "--preset", "mixtral-8x7b", "--hosts", "3x24GiB:8c"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("need 4 such hosts") && err.contains("quantize"),
        "{err}"
    );
    // Q8_0 experts fit on three, the spare room holding replicas.
    let v = plan_json(&[
        "--preset",
        "mixtral-8x7b",
        "--hosts",
        "3x24GiB:8c",
        "--quantize",
        "q8_0",
    ]);
    let reps: u64 = v["plan"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_u64().unwrap())
        .sum();
    assert!(reps > 8, "{reps}");
    for (args, why) in [
        (vec!["--hosts", "4x24GiB"], "no cores"),
        (vec!["--hosts", "4x24GiB:8c", "--net", "fast"], "network"),
        (vec!["--hosts", "4x24GiB:8c", "--streams", "0"], "streams"),
    ] {
        let o = run(&[&["plan", "--preset", "mixtral-8x7b"], &args[..]].concat());
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
}

#[test]
fn a_calibration_measured_here_drives_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-mixtral");
    let m = model.to_str().unwrap();
    let out = tmp.path().to_str().unwrap();
    run_ok(&[
        "--threads",
        "1",
        "bench",
        "--model",
        m,
        "--calibrate",
        "--out",
        out,
    ]);
    let path = tmp.path().join("calibration.json");
    let cal: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let curves = cal["expert"].as_array().unwrap();
    let names: Vec<&str> = curves
        .iter()
        .map(|c| c["dtype"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["F32", "Q8_0", "Q4_0"]);
    for c in curves {
        assert!(c["ns_per_byte"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.as_f64().unwrap() > 0.0));
    }
    assert!(cal["read_bytes_per_s_core"].as_f64().unwrap() > 1e8);
    let v = plan_json(&[
        "--model",
        m,
        "--calibration",
        path.to_str().unwrap(),
        "--hosts",
        "2x1GiB:1c",
        "--reserve",
        "0",
    ]);
    assert_eq!(v["plan"]["placement"].as_array().unwrap().len(), 2);
    assert!(v["plan"]["batch1"]["tok_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["calibration"]["model"].as_str().unwrap(), m);
}
