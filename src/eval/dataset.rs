//! TIMED-format datasets: `old,new,positive1,gt1,…,positive5,gt5,negative1,gn1,…,negative5,gn5`.

use std::path::Path;

use super::EvalError;

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
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |line: usize, why: String| EvalError::Dataset {
        path: path.to_path_buf(),
        line,
        why,
    };
    let records = parse_csv(&text).map_err(|(line, why)| bad(line, why))?;
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
    for (line, cells) in body {
        if cells.iter().all(|c| c.trim().is_empty()) {
            continue;
        }
        let cell = |i: usize| {
            cells
                .get(i)
                .map(|c| c.trim().to_owned())
                .unwrap_or_default()
        };
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
}
