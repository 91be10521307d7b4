//! Error lines at the CLI edge: the chain of causes on one line, and the
//! advice that needs a flag name. The library's errors say what is wrong
//! and know no flags; the few whose remedy is a flag get it added here.

use std::error::Error;

use time_onnx::edit::WeightError;
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
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
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
        _ => None,
    }
}

fn edit(e: &EditJobError) -> Option<Wording> {
    match e {
        EditJobError::Session(s) => session(s),
        EditJobError::Weight(WeightError::Overflow { .. }) => {
            Some(Wording::Then("; use a larger --lambda or a float32 model"))
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
        _ => None,
    }
}

fn scoring(e: &EvalError) -> Option<Wording> {
    match e {
        EvalError::Session(s) => session(s),
        _ => None,
    }
}
