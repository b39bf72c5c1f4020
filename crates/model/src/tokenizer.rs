//! Text in and out: the checkpoint's `tokenizer.json` (the `tokenizers` crate) and the chat
//! template from `tokenizer_config.json` rendered with minijinja, configured like transformers'
//! Jinja environment (trim_blocks, lstrip_blocks, loop controls, `raise_exception`).

use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A checkpoint's tokenizer and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

/// The inverse of GPT-2's byte-to-character table, which byte-level BPE vocabularies spell
/// their tokens in: printable bytes stand for themselves, the other 68 for U+0100 onwards.
fn byte_level_decoding() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            (c, b)
        })
        .collect()
}

/// `"<s>"` or `{"content": "<s>", ...}` in tokenizer_config.json.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, if present, `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", cfg_path.display())))?
        } else {
            serde_json::Value::Null
        };
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: use "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        Ok(Self {
            inner,
            chat_template,
            bos_token: token_text(cfg.get("bos_token")).unwrap_or_else(|| "<s>".into()),
            eos_token: token_text(cfg.get("eos_token")).unwrap_or_else(|| "</s>".into()),
        })
    }

    /// A tokenizer from tokenizer.json text and what tokenizer_config.json would say (a GGUF
    /// file's metadata, converted).
    pub(crate) fn from_json(
        json: &str,
        chat_template: Option<String>,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| ModelError::Tokenizer(format!("from GGUF metadata: {e}")))?;
        Ok(Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
        })
    }

    /// Token ids of `text`; `add_special` applies the post-processor (e.g. prepends BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// An incremental decoder that yields text only once it forms whole characters.
    #[must_use]
    pub fn stream(&self, skip_special: bool) -> TextStream<'_> {
        TextStream {
            inner: self.inner.decode_stream(skip_special),
        }
    }

    /// The id of a token string, if it is in the vocabulary.
    #[must_use]
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The bytes each token id adds to the text, `None` for special tokens: what structured
    /// output runs through its grammar. Byte-level BPE vocabularies (GPT-2's byte-to-character
    /// table) and SentencePiece ones (`▁` for a space, `<0xXX>` byte fallback) are both read.
    #[must_use]
    pub fn token_bytes(&self) -> Vec<Option<Vec<u8>>> {
        let byte_level = serde_json::to_string(&self.inner.get_decoder())
            .is_ok_and(|d| d.contains("\"ByteLevel\""));
        let special: std::collections::HashSet<u32> = self
            .inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        let unbyte = byte_level_decoding();
        (0..self.inner.get_vocab_size(true) as u32)
            .map(|id| {
                if special.contains(&id) {
                    return None;
                }
                let t = self.inner.id_to_token(id)?;
                Some(if byte_level {
                    let mut out = Vec::with_capacity(t.len());
                    for c in t.chars() {
                        match unbyte.get(&c) {
                            Some(&b) => out.push(b),
                            None => out.extend_from_slice(c.to_string().as_bytes()),
                        }
                    }
                    out
                } else if let Some(b) = t
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    vec![b]
                } else {
                    t.replace('\u{2581}', " ").into_bytes()
                })
            })
            .collect()
    }

    /// Whether tokenizer_config.json has a chat template.
    #[must_use]
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the chat template. The template itself enforces role rules
    /// (Mistral's raises on non-alternating roles); its message comes back as the error.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self.chat_template.as_deref().ok_or_else(|| {
            ModelError::ChatTemplate("tokenizer_config.json has no chat_template".into())
        })?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", tpl)
            .map_err(|e| ModelError::ChatTemplate(format!("template does not parse: {e}")))?;
        let t = env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            add_generation_prompt => add_generation_prompt,
        })
        .map_err(|e| {
            // Show the template's own message (raise_exception) rather than minijinja's wrapper.
            let detail = e
                .detail()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            ModelError::ChatTemplate(detail)
        })
    }
}

/// Incremental detokenizer (see [`Tokenizer::stream`]).
pub struct TextStream<'a> {
    inner: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl TextStream<'_> {
    /// Feeds one id; returns the text it completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.inner
            .step(id)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }
}
