//! TIMED-format datasets: `old,new,positive1,gt1,…,positive5,gt5,negative1,gn1,…,negative5,gn5`.

use std::path::Path;

use super::EvalError;
use crate::edit::record::PromptPair;

/// One edit and its probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The source prompt (what the model assumes).
    pub old: String,
    /// The destination prompt (what it should assume).
    pub new: String,
    /// (positive prompt, what an edited model should draw for it): generality.
    pub positives: Vec<(String, String)>,
    /// (negative prompt, what the edit must not turn it into): specificity.
    pub negatives: Vec<(String, String)>,
}

/// Reads a TIMED CSV. Pairs whose cells are both empty are skipped (some
/// rows have fewer than five); a missing column or a half-empty pair is an
/// error naming the line.
pub fn read(path: &Path) -> Result<Vec<Row>, EvalError> {
    let bad = bad_line(path);
    let records = read_csv(path)?;
    let Some((header, body)) = records.split_first() else {
        return Err(bad(1, "the file is empty".into()));
    };
    let column = |name: &str| {
        header
            .1
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| {
                bad(
                    1,
                    format!("no column {name:?} (TIMED's columns are old,new,positive1,gt1,…)"),
                )
            })
    };
    let (old, new) = (column("old")?, column("new")?);
    let pairs = |a: &str, b: &str| -> Result<Vec<(usize, usize)>, EvalError> {
        (1..=5)
            .map(|k| Ok((column(&format!("{a}{k}"))?, column(&format!("{b}{k}"))?)))
            .collect()
    };
    let (pos, neg) = (pairs("positive", "gt")?, pairs("negative", "gn")?);
    let mut rows = Vec::new();
    for (line, cells) in filled(body) {
        let cell = |i: usize| cell(cells, i);
        let collect = |which: &[(usize, usize)]| -> Result<Vec<(String, String)>, EvalError> {
            let mut out = Vec::new();
            for &(a, b) in which {
                match (cell(a), cell(b)) {
                    (x, y) if x.is_empty() && y.is_empty() => {}
                    (x, y) if x.is_empty() || y.is_empty() => {
                        return Err(bad(*line, format!("half-empty pair {x:?} / {y:?}")));
                    }
                    pair => out.push(pair),
                }
            }
            Ok(out)
        };
        let row = Row {
            old: cell(old),
            new: cell(new),
            positives: collect(&pos)?,
            negatives: collect(&neg)?,
        };
        if row.old.is_empty() || row.new.is_empty() {
            return Err(bad(*line, "empty old or new prompt".into()));
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Reads a list of edits to solve together: a CSV with `src,dst` columns,
/// or TIMED's `old,new` (so a TIMED file is an edit list too); other
/// columns are ignored, blank lines skipped, an empty prompt is an error
/// naming its line.
pub fn read_edit_pairs(path: &Path) -> Result<Vec<PromptPair>, EvalError> {
    let bad = bad_line(path);
    let records = read_csv(path)?;
    let Some(((_, header), body)) = records.split_first() else {
        return Err(bad(1, "the file is empty".into()));
    };
    let column = |name: &str| header.iter().position(|h| h.trim() == name);
    let (src, dst) = match (column("src"), column("dst"), column("old"), column("new")) {
        (Some(s), Some(d), _, _) | (_, _, Some(s), Some(d)) => (s, d),
        _ => {
            return Err(bad(
                1,
                "no src,dst columns (nor TIMED's old,new) in the header".into(),
            ));
        }
    };
    let mut pairs = Vec::new();
    for (line, cells) in filled(body) {
        let cell = |i: usize| cell(cells, i);
        let (source, destination) = (cell(src), cell(dst));
        if source.is_empty() || destination.is_empty() {
            return Err(bad(*line, "empty source or destination prompt".into()));
        }
        pairs.push(PromptPair {
            source,
            destination,
        });
    }
    if pairs.is_empty() {
        return Err(bad(1, "no edits below the header".into()));
    }
    Ok(pairs)
}

/// Reads a prompt list: one prompt a line, blank lines and lines starting
/// with `#` skipped.
pub fn read_prompts(path: &Path) -> Result<Vec<String>, EvalError> {
    let text = read_text(path)?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if prompts.is_empty() {
        return Err(bad_line(path)(1, "no prompts in the file".into()));
    }
    Ok(prompts)
}

/// The records with a non-blank cell.
fn filled(body: &[Record]) -> impl Iterator<Item = (&usize, &Vec<String>)> {
    body.iter()
        .map(|(line, cells)| (line, cells))
        .filter(|(_, cells)| cells.iter().any(|c| !c.trim().is_empty()))
}

/// Cell `i`, trimmed; a missing cell is empty.
fn cell(cells: &[String], i: usize) -> String {
    cells
        .get(i)
        .map(|c| c.trim().to_owned())
        .unwrap_or_default()
}

/// The error for `path` at a line.
fn bad_line(path: &Path) -> impl Fn(usize, String) -> EvalError + '_ {
    move |line, why| EvalError::Dataset {
        path: path.to_path_buf(),
        line,
        why,
    }
}

/// The text of a list or dataset file, up to [`crate::bounded::TEXT_LIMIT`].
fn read_text(path: &Path) -> Result<String, EvalError> {
    crate::bounded::read_to_string(path, crate::bounded::TEXT_LIMIT).map_err(|source| {
        EvalError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The records of the CSV file at `path`.
fn read_csv(path: &Path) -> Result<Vec<Record>, EvalError> {
    let text = read_text(path)?;
    parse_csv(&text).map_err(|(line, why)| bad_line(path)(line, why))
}

/// A CSV record's cells, with the line it starts on.
type Record = (usize, Vec<String>);

/// RFC 4180 records with their first line number: commas, double-quoted
/// fields with `""` escapes and embedded newlines, LF or CRLF line ends.
/// An error is the line and what is wrong.
fn parse_csv(text: &str) -> Result<Vec<Record>, (usize, String)> {
    let mut records = Vec::new();
    let (mut record, mut field) = (Vec::new(), String::new());
    let (mut line, mut start_line) = (1, 1);
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push((start_line, std::mem::take(&mut record)));
                line += 1;
                start_line = line;
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err((start_line, "a quoted field is not closed".into()));
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push((start_line, record));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_commas_and_crlf() {
        let r = parse_csv("a,\"b, c\",\"say \"\"hi\"\"\"\r\nd,,\"multi\nline\"\n").unwrap();
        assert_eq!(
            r[0],
            (1, vec!["a".into(), "b, c".into(), "say \"hi\"".into()])
        );
        assert_eq!(r[1], (2, vec!["d".into(), "".into(), "multi\nline".into()]));
        assert!(parse_csv("\"open").is_err());
    }

    fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.csv");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn edit_lists_take_src_dst_or_old_new() {
        let pair = |s: &str, d: &str| PromptPair {
            source: s.into(),
            destination: d.into(),
        };
        let (_d, p) = file("dst,src\n\"a blue circle\",a circle\n\n a red square , a square\n");
        assert_eq!(
            read_edit_pairs(&p).unwrap(),
            vec![
                pair("a circle", "a blue circle"),
                pair("a square", "a red square")
            ]
        );
        let (_d, p) = file("old,new,positive1\nA rose,A blue rose,x\n");
        assert_eq!(
            read_edit_pairs(&p).unwrap(),
            vec![pair("A rose", "A blue rose")]
        );
        for (text, why) in [
            ("source,target\na,b\n", "no src,dst columns"),
            ("src,dst\na,\n", "line 2: empty source or destination"),
            ("src,dst\n", "no edits below the header"),
            ("", "the file is empty"),
        ] {
            let (_d, p) = file(text);
            let err = read_edit_pairs(&p).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    #[test]
    fn prompt_lists_skip_blanks_and_comments() {
        let (_d, p) = file("# everyday things\na cup\n\n  a dog on grass \n");
        assert_eq!(read_prompts(&p).unwrap(), vec!["a cup", "a dog on grass"]);
        let (_d, p) = file("# nothing\n\n");
        assert!(
            read_prompts(&p)
                .unwrap_err()
                .to_string()
                .contains("no prompts")
        );
    }
}
