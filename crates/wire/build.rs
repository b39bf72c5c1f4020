//! Compiles every .proto under ../../proto (protoc must be on PATH or in $PROTOC; see scripts/setup.sh).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["../../proto/switchyard/v1/expert.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        // Hidden states travel as raw bytes; `Bytes` lets prost hand them over without a copy.
        .bytes(".switchyard.v1")
        .compile_protos(&protos, &["../../proto"])?;
    Ok(())
}
