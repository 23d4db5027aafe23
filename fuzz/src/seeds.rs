//! Writes the seed corpora: `seeds <fuzz dir>` fills `corpus/gguf` and `corpus/peft`.

use std::path::PathBuf;

use lugh::fuzzing;

fn main() -> std::io::Result<()> {
    let fuzz_dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz".into()));
    let gguf = fuzz_dir.join("corpus/gguf");
    let peft = fuzz_dir.join("corpus/peft");
    std::fs::create_dir_all(&gguf)?;
    std::fs::create_dir_all(&peft)?;
    std::fs::write(gguf.join("tiny-model"), fuzzing::tiny_model())?;
    std::fs::write(gguf.join("tiny-adapter"), fuzzing::tiny_adapter())?;
    let weights = fuzzing::tiny_peft();
    for (name, config) in [
        (
            "with-config",
            Some(&br#"{"peft_type": "LORA", "r": 1, "lora_alpha": 2}"#[..]),
        ),
        (
            "rslora-pattern",
            Some(br#"{"use_rslora": true, "alpha_pattern": {"q_proj": 4}}"#),
        ),
        ("without-config", None),
    ] {
        let mut input = match config {
            Some(c) => (c.len() as u16).to_le_bytes().to_vec(),
            None => vec![0xff, 0xff],
        };
        input.extend(config.unwrap_or_default());
        input.extend(&weights);
        std::fs::write(peft.join(name), input)?;
    }
    Ok(())
}
