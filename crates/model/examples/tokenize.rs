#![allow(clippy::print_stdout)] // a tool whose output is its answer
//! Token ids of a text under a checkpoint's tokenizer (a folder's tokenizer.json, or a GGUF
//! file's metadata), to compare two tokenizers:
//!
//!   cargo run --release -p switchyard-model --example tokenize -- MODEL "some text"

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(text)) = (args.next(), args.next()) else {
        return Err("usage: tokenize MODEL TEXT".into());
    };
    let ck = switchyard_model::Checkpoint::open(&model)?;
    let tok = ck.tokenizer()?;
    println!("{:?}", tok.encode(&text, true)?);
    Ok(())
}
