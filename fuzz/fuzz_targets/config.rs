//! config.json: any text is refused with a named error or gives a config whose sizes agree.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard_model::MixtralConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = MixtralConfig::from_json(text, std::path::Path::new("config.json")) {
        assert!(c.num_experts_per_tok <= c.num_local_experts);
        assert_eq!(c.num_attention_heads % c.num_key_value_heads, 0);
    }
});
