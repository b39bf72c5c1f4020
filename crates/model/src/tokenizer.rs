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
        render_chat_template(
            tpl,
            &self.bos_token,
            &self.eos_token,
            messages,
            add_generation_prompt,
        )
    }
}

/// Instructions a chat template may run per rendering: a template comes with the checkpoint, so
/// one that loops (or nests loops) without end fails instead of holding a thread. Mixtral's
/// template spends about 20 per message.
pub const CHAT_TEMPLATE_FUEL: u64 = 20_000_000;

/// Renders `messages` with the Jinja `template` as transformers does (trimmed blocks,
/// Python-style methods, `raise_exception`), within [`CHAT_TEMPLATE_FUEL`].
pub fn render_chat_template(
    template: &str,
    bos_token: &str,
    eos_token: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
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
    env.add_template("chat", template)
        .map_err(|e| ModelError::ChatTemplate(format!("template does not parse: {e}")))?;
    let t = env
        .get_template("chat")
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
    t.render(minijinja::context! {
        messages => messages,
        bos_token => bos_token,
        eos_token => eos_token,
        add_generation_prompt => add_generation_prompt,
    })
    .map_err(|e| {
        if e.kind() == minijinja::ErrorKind::OutOfFuel {
            return ModelError::ChatTemplate(format!(
                "the chat template ran more than {CHAT_TEMPLATE_FUEL} instructions"
            ));
        }
        // Show the template's own message (raise_exception) rather than minijinja's wrapper.
        let detail = e
            .detail()
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string());
        ModelError::ChatTemplate(detail)
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fixture_template() -> String {
        let cfg: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                crate::tests::fixtures().join("tiny-mixtral-trained/tokenizer_config.json"),
            )
            .unwrap(),
        )
        .unwrap();
        cfg["chat_template"].as_str().unwrap().to_string()
    }

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn a_template_that_loops_too_long_fails_with_a_clear_error() {
        let nested =
            "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}";
        let t = std::time::Instant::now();
        let err = render_chat_template(nested, "<s>", "</s>", &[], true).unwrap_err();
        assert!(err.to_string().contains("instructions"), "{err}");
        assert!(t.elapsed() < std::time::Duration::from_secs(30));
    }

    #[test]
    fn a_long_conversation_renders_well_within_the_fuel() {
        let tpl = fixture_template();
        let messages: Vec<ChatMessage> = (0..20_000)
            .map(|i| msg(if i % 2 == 0 { "user" } else { "assistant" }, "hello"))
            .collect();
        let out = render_chat_template(&tpl, "<s>", "</s>", &messages, true).unwrap();
        assert!(out.matches("[INST]").count() == 10_000, "{}", &out[..200]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The checkpoint's template with any messages renders or refuses with its own
        /// message; nothing panics.
        #[test]
        fn any_messages_render_or_are_refused(
            turns in prop::collection::vec(
                (prop::sample::select(vec!["user", "assistant", "system", "tool", ""]), ".{0,40}"),
                0..12,
            ),
            gen in any::<bool>(),
        ) {
            let tpl = fixture_template();
            let messages: Vec<ChatMessage> = turns.iter().map(|(r, c)| msg(r, c)).collect();
            match render_chat_template(&tpl, "<s>", "</s>", &messages, gen) {
                Ok(text) => {
                    for m in &messages {
                        prop_assert!(text.contains(m.content.trim()) || m.content.trim().is_empty());
                    }
                }
                Err(e) => prop_assert!(matches!(e, ModelError::ChatTemplate(_))),
            }
        }

        /// Any template text (from Jinja's own alphabet) parses and renders or is refused
        /// with an error; nothing panics or runs without end.
        #[test]
        fn any_template_renders_or_is_refused(
            parts in prop::collection::vec(prop::sample::select(vec![
                "{%", "%}", "{{", "}}", "for", "in", "endfor", "if", "endif", "else", "set",
                "messages", "message", "range(", "(", ")", "[", "]", "'", "\"", "*", "+", "~",
                "loop.index", "raise_exception(", "|", "length", "join", " ", "x", "0", "9999",
                "bos_token", "namespace(", ".", "=", ",", "-", "{#", "#}",
            ]), 0..40),
        ) {
            let tpl: String = parts.concat();
            let messages = [msg("user", "hi"), msg("assistant", "yo")];
            if let Err(e) = render_chat_template(&tpl, "<s>", "</s>", &messages, true) {
                prop_assert!(matches!(e, ModelError::ChatTemplate(_)));
            }
        }
    }
}
