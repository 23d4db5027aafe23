//! Chat templates: a conversation rendered to the prompt text a model was trained on, by the
//! Jinja template its GGUF carries (`tokenizer.chat_template`), as transformers'
//! `apply_chat_template` renders it: trimmed blocks, loop controls, `tojson` as Python's
//! `json.dumps`, `raise_exception`, `strftime_now`, and Python's string and dict methods.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter};

use crate::error::{Error, Result};

/// The GGUF key holding the template.
pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// A template with the special tokens it may print.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> ChatTemplate {
        ChatTemplate {
            source,
            bos_token,
            eos_token,
        }
    }

    /// Renders `messages` (a JSON list of `{"role", "content", ...}`) with `add_generation_prompt`
    /// and `extra` template variables (`tools`, `enable_thinking`, `date_string`, ...).
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        if !messages.is_array() {
            return Err(Error::invalid("messages", "must be a list of messages"));
        }
        let env = environment();
        let template = env
            .template_from_str(&self.source)
            .map_err(template_error)?;
        let mut context = extra.clone();
        context.insert("messages".into(), messages.clone());
        context.insert("add_generation_prompt".into(), add_generation_prompt.into());
        context.insert("bos_token".into(), self.bos_token.clone().into());
        context.insert("eos_token".into(), self.eos_token.clone().into());
        template
            .render(Value::from(Serde(&context)))
            .map_err(template_error)
    }
}

fn template_error(err: minijinja::Error) -> Error {
    let reason = match err.kind() {
        // raise_exception's message is the template author's: give it alone.
        ErrorKind::InvalidOperation => err.detail().unwrap_or_default().to_string(),
        _ => format!("{err:#}"),
    };
    Error::invalid("chat template", reason)
}

/// The environment transformers renders chat templates in.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", |format: String| {
        chrono::Local::now().format(&format).to_string()
    });
    env
}

/// `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`, as transformers'
/// `tojson` filter: `", "` and `": "` between items, or newlines and `indent` spaces.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if sort_keys == Some(true) {
        json.sort_all_objects();
    }
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                PrettyFormatter::with_indent(&spaces),
            );
            json.serialize(&mut ser)
        }
        None => json.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonFormatter,
        )),
    };
    written.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    Ok(Value::from_safe_string(text))
}

/// Python's default `json.dumps` separators: `", "` and `": "`.
struct PythonFormatter;

/// `", "` before every item of an array or object but the first.
fn item_separator<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    match first {
        true => Ok(()),
        false => writer.write_all(b", "),
    }
}

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: serde_json::Value) -> Result<String> {
        let template = ChatTemplate::new(source.into(), "<s>".into(), "</s>".into());
        template.render(&messages, true, &serde_json::Map::new())
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let out = render(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}",
            serde_json::json!([{"b": [1, 2.5, "é\"\n"], "a": null}]),
        )
        .unwrap();
        let compact = r#"{"b": [1, 2.5, "é\"\n"], "a": null}"#;
        let pretty = "{\n  \"b\": [\n    1,\n    2.5,\n    \"é\\\"\\n\"\n  ],\n  \"a\": null\n}";
        assert_eq!(out, format!("{compact}|{pretty}"));
    }

    #[test]
    fn raise_exception_gives_the_templates_message() {
        let err = render(
            "{{ raise_exception('roles must alternate') }}",
            serde_json::json!([]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid chat template: roles must alternate"
        );
    }

    #[test]
    fn syntax_errors_and_bad_messages_are_errors() {
        let err = render("{% for %}", serde_json::json!([])).unwrap_err();
        assert!(err.to_string().contains("syntax error"), "{err}");
        let err = render("x", serde_json::json!({"role": "user"})).unwrap_err();
        assert!(err.to_string().contains("list of messages"), "{err}");
    }
}
