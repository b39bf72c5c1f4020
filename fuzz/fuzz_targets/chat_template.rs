//! Chat templates come with checkpoints and messages with requests: any template text with any
//! messages renders or is refused with an error, within the template fuel.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard_model::{tokenizer::render_chat_template, ChatMessage};

fuzz_target!(|data: &[u8]| {
    let (template, messages) = switchyard_fuzz::split(data);
    let Ok(template) = std::str::from_utf8(template) else {
        return;
    };
    let messages: Vec<ChatMessage> = serde_json::from_slice(messages).unwrap_or_else(|_| {
        vec![
            ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: "hello".into(),
            },
        ]
    });
    let _ = render_chat_template(template, "<s>", "</s>", &messages, true);
});
