//! Error lines at the CLI edge: the chain of causes on one line, and the
//! advice that needs a flag name. The library's errors say what is wrong
//! and know no flags; the few whose remedy is a flag get it added here.

use std::error::Error;

use time_onnx::edit::{EditError, WeightError};
use time_onnx::eval::EvalError;
use time_onnx::pipeline::denoise::DenoiseError;
use time_onnx::runtime::SessionError;
use time_onnx::workflow::edit::EditJobError;
use time_onnx::workflow::eval::EvalJobError;
use time_onnx::workflow::generate::GenerateError;

/// The chain of causes, outermost first, on one line. Our error messages
/// already quote their source, so a cause the previous message ends with is
/// not repeated.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = in_flag_terms(cause)
            .unwrap_or_else(|| cause.to_string())
            .replace('\n', " ");
        if out.ends_with(&text) {
            continue;
        }
        let text = without_named_path(&out, &text);
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    out
}

/// A command-line mistake on one line, like every other error: clap's message
/// without its usage block ("--help" shows that), indented detail lines
/// (the missing arguments, a tip) joined on.
pub fn usage_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    text.lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `text` without its leading "PATH: " when the line so far already names
/// that path ("editing X: X: bad data" reads "editing X: bad data").
fn without_named_path<'a>(line: &str, text: &'a str) -> &'a str {
    match text.split_once(": ") {
        Some((head, rest))
            if head.contains(['/', '.']) && !rest.is_empty() && line.contains(head) =>
        {
            rest
        }
        _ => text,
    }
}

/// How the CLI words a library error.
enum Wording {
    /// The library's text, then this.
    Then(&'static str),
    /// This instead of the library's text.
    Instead(&'static str),
}

/// The text of `cause` in the CLI's terms, when it needs a flag name.
fn in_flag_terms(cause: &(dyn Error + 'static)) -> Option<String> {
    let wording = if let Some(e) = cause.downcast_ref::<SessionError>() {
        session(e)
    } else if let Some(e) = cause.downcast_ref::<GenerateError>() {
        generate(e)
    } else if let Some(e) = cause.downcast_ref::<EditJobError>() {
        edit(e)
    } else if let Some(e) = cause.downcast_ref::<EvalJobError>() {
        eval(e)
    } else if let Some(e) = cause.downcast_ref::<EvalError>() {
        scoring(e)
    } else {
        None
    }?;
    Some(match wording {
        Wording::Then(more) => format!("{cause}{more}"),
        Wording::Instead(text) => text.to_string(),
    })
}

fn session(e: &SessionError) -> Option<Wording> {
    match e {
        SessionError::Cuda { .. } => Some(Wording::Then(
            " (run `time-onnx doctor`, or use --device cpu)",
        )),
        SessionError::GpuOnlyOperators { .. } => Some(Wording::Then(
            "; run it with --device cuda, or use the unoptimized export",
        )),
        _ => None,
    }
}

fn generate(e: &GenerateError) -> Option<Wording> {
    match e {
        GenerateError::Session(s) | GenerateError::Denoise(DenoiseError::Session(s)) => session(s),
        GenerateError::OtherTextEncoder { .. } => {
            Some(Wording::Then("; use --force to apply it anyway"))
        }
        GenerateError::NothingToDo => Some(Wording::Instead(
            "--steps and --num-images must be at least 1",
        )),
        GenerateError::TooLarge { .. } => Some(Wording::Then(
            "; ask for fewer or smaller images, or set --max-memory if you know it fits",
        )),
        _ => None,
    }
}

fn edit(e: &EditJobError) -> Option<Wording> {
    match e {
        EditJobError::Session(s) => session(s),
        EditJobError::Weight(WeightError::Overflow { .. }) => {
            Some(Wording::Then("; use a larger --lambda or a float32 model"))
        }
        // Concept replacement ("Van Gogh" → "art") is short; long prompts
        // keep the error readable without the hint.
        EditJobError::Edit(EditError::MissingWord { src, .. }) if src.len() <= 60 => {
            Some(Wording::Then("; --erase replaces a concept by other words"))
        }
        EditJobError::ValuesOnlyOperator => Some(Wording::Instead(
            "--save-operator cannot represent a values-only edit: an operator changes the text \
             embeddings, which reach keys and values alike; drop --values-only or write an edited \
             UNet instead",
        )),
        _ => None,
    }
}

fn eval(e: &EvalJobError) -> Option<Wording> {
    match e {
        EvalJobError::Generate(g) => generate(g),
        EvalJobError::Edit(x) => edit(x),
        EvalJobError::Eval(x) => scoring(x),
        EvalJobError::NothingToDo => Some(Wording::Instead(
            "--seeds, --steps and --batch must be at least 1",
        )),
        EvalJobError::ReportExists(_) => Some(Wording::Then(
            ": pass --resume to continue it, or choose another output folder",
        )),
        EvalJobError::OtherSettings { .. } => Some(Wording::Then("; --resume needs the same")),
        EvalJobError::ConflictingRows { .. } => Some(Wording::Then(" (choose rows with --rows)")),
        _ => None,
    }
}

fn scoring(e: &EvalError) -> Option<Wording> {
    match e {
        EvalError::Session(s) => session(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_fit_on_one_line() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Args {
            #[arg(long)]
            src: String,
            #[arg(long)]
            steps: Option<usize>,
        }
        let line = |argv: &[&str]| usage_line(&Args::try_parse_from(argv).unwrap_err());
        assert_eq!(
            line(&["t"]),
            "error: the following required arguments were not provided: --src <SRC>"
        );
        assert_eq!(
            line(&["t", "--src", "a", "--steps", "x"]),
            "error: invalid value 'x' for '--steps <STEPS>': invalid digit found in string"
        );
    }

    #[test]
    fn a_path_the_line_already_names_is_not_repeated() {
        let err = anyhow::anyhow!("m/unet/model.onnx: external data location \"w.pb\" is missing")
            .context("editing m/unet/model.onnx");
        assert_eq!(
            one_line(&err),
            "editing m/unet/model.onnx: external data location \"w.pb\" is missing"
        );
        // Another file's path stays, and so does a head that is not a path.
        let err =
            anyhow::anyhow!("m/unet/weights.pb: truncated").context("editing m/unet/model.onnx");
        assert_eq!(
            one_line(&err),
            "editing m/unet/model.onnx: m/unet/weights.pb: truncated"
        );
        let err = anyhow::anyhow!("scheduler: unknown").context("loading scheduler");
        assert_eq!(one_line(&err), "loading scheduler: scheduler: unknown");
    }
}
