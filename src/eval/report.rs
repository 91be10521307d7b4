//! An evaluation's report: `results.json` (settings, every row's judgments
//! and scores, a digest) and `report.md` (the paper's table), and the
//! scoring that turns judgments into the paper's three numbers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Pick, Scores};

/// Reading or writing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A `results.json` that does not parse (cut short, or not a report).
    #[error("{}: not a whole report", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What serde saw.
        source: serde_json::Error,
    },
    /// The report could not be serialised.
    #[error("cannot serialise the report: {0}")]
    Serialise(#[source] serde_json::Error),
}

/// The settings a report was made with: `--resume` and merging require the
/// same [`Settings::identity`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The model folder (as given; its contents are in `inputs`).
    pub model: String,
    /// The dataset file (as given; its contents are in `inputs`).
    pub dataset: String,
    /// What the inputs contained.
    #[serde(default)]
    pub inputs: Inputs,
    /// Seeds per prompt.
    pub seeds: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// λ.
    pub lambda: f64,
    /// The preservation prompt file and scale, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preservation: Option<Preservation>,
    /// Whether every row's edit was solved together.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_at_once: bool,
    /// Scheduler name.
    pub scheduler: String,
    /// Classifier (`toy` or `clip:<dir>`).
    pub classifier: String,
    /// The tool that wrote it.
    pub tool: String,
}

/// SHA-256 digests of everything an evaluation reads ([`super::digest`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Inputs {
    /// The model folder's files that generation and the toy judge read.
    pub model: String,
    /// The dataset file.
    pub dataset: String,
    /// The preservation prompt file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preservation: Option<String>,
    /// A CLIP judge's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier: Option<String>,
}

/// UCE's preservation term as an evaluation used it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preservation {
    /// The prompt file (as given; its contents are in [`Inputs::preservation`]).
    pub prompts: String,
    /// The term's weight.
    pub scale: f64,
}

impl Settings {
    /// The settings with every path left out: two runs that read the same
    /// bytes with the same settings have the same identity wherever their
    /// files are.
    pub fn identity(&self) -> Settings {
        let mut s = self.clone();
        s.model.clear();
        s.dataset.clear();
        if let Some(p) = &mut s.preservation {
            p.prompts.clear();
        }
        if let Some((kind, _)) = s.classifier.split_once(':') {
            s.classifier = kind.to_string();
        }
        s
    }

    /// The fields in which the identities of `self` and `other` differ, as
    /// `name: ours vs theirs`.
    pub fn differences(&self, other: &Settings) -> Vec<String> {
        let (Ok(a), Ok(b)) = (
            serde_json::to_value(self.identity()),
            serde_json::to_value(other.identity()),
        ) else {
            return vec!["(unserialisable settings)".into()];
        };
        let mut out = Vec::new();
        diff_values("", &a, &b, &mut out);
        out
    }
}

fn diff_values(at: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let name = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                diff_values(
                    &name,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{at}: {a} vs {b}")),
        _ => {}
    }
}

/// Which part of an evaluation's rows a report holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// Its number, from 0.
    pub index: usize,
    /// How many shards the rows were cut into.
    pub count: usize,
    /// This shard's rows, `[start, end)`.
    pub rows: [usize; 2],
    /// Every shard's rows together, `[start, end)`.
    pub range: [usize; 2],
}

impl Shard {
    /// Shard `index` of `count` contiguous slices of `range`, the first ones
    /// the shorter when the rows do not divide evenly. `None` unless
    /// `index < count` and every slice holds a row.
    pub fn of(range: std::ops::Range<usize>, index: usize, count: usize) -> Option<Shard> {
        let n = range.len();
        if index >= count || count > n {
            return None;
        }
        let at = |k: usize| range.start + n * k / count;
        Some(Shard {
            index,
            count,
            rows: [at(index), at(index + 1)],
            range: [range.start, range.end],
        })
    }

    /// Its rows as a range.
    pub fn rows(&self) -> std::ops::Range<usize> {
        self.rows[0]..self.rows[1]
    }
}

/// Which model drew an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// The original model.
    Unedited,
    /// The model after this row's edit.
    Edited,
    /// The original model given the destination-style prompts.
    Oracle,
}

/// Which of the row's prompt sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Set {
    /// `old` (efficacy).
    Source,
    /// `positiveK` (generality).
    Positive,
    /// `negativeK` (specificity).
    Negative,
}

/// The judgments of one prompt's images.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptResult {
    /// Model variant.
    pub variant: Variant,
    /// Prompt set.
    pub set: Set,
    /// The prompt generated.
    pub prompt: String,
    /// The two candidates the classifier chose between (the original-style
    /// one first).
    pub candidates: [String; 2],
    /// Per seed: which one it showed.
    pub picks: Vec<Option<Pick>>,
}

/// One row's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RowResult {
    /// Its index in the dataset.
    pub index: usize,
    /// Source prompt.
    pub old: String,
    /// Destination prompt.
    pub new: String,
    /// Scores per variant.
    pub scores: BTreeMap<String, Scores>,
    /// Every prompt's judgments.
    pub prompts: Vec<PromptResult>,
    /// SHA-256 of its grid image, `row-NN.png`, when one was drawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<String>,
    /// Wall time of the row (a timing field: not in the digest).
    pub seconds: f64,
}

/// Everything written to `results.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// How it was made.
    pub settings: Settings,
    /// Rows done so far, in dataset order.
    pub rows: Vec<RowResult>,
    /// Which shard of the rows this is, when the evaluation was cut into shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
    /// Mean scores over the rows, per variant.
    pub average: BTreeMap<String, Scores>,
    /// SHA-256 of everything above but the timing fields ([`Report::digest`]),
    /// so that a report changed or cut short after it was written is told
    /// from one the tool wrote.
    #[serde(default)]
    pub digest: String,
}

impl Report {
    /// An empty report.
    pub fn new(settings: Settings, shard: Option<Shard>) -> Report {
        Report {
            settings,
            rows: Vec::new(),
            shard,
            average: BTreeMap::new(),
            digest: String::new(),
        }
    }

    /// Adds a row's outcome, keeping rows in dataset order and the means and
    /// the digest current.
    pub fn push(&mut self, row: RowResult) {
        self.rows.push(row);
        self.rows.sort_by_key(|r| r.index);
        self.seal();
    }

    /// Recomputes the means and the digest from the rows.
    pub fn seal(&mut self) {
        self.average = average(&self.rows);
        self.digest = self.digest();
    }

    /// SHA-256 of the report's JSON with the digest field empty and every
    /// row's `seconds` zero: what the report says, without when it was made.
    pub fn digest(&self) -> String {
        let mut bare = self.clone();
        bare.digest.clear();
        for r in &mut bare.rows {
            r.seconds = 0.0;
        }
        // Serialising plain data to a string cannot fail.
        super::digest::bytes(serde_json::to_string(&bare).unwrap_or_default().as_bytes())
    }

    /// Whether the digest is the one its contents give.
    pub fn intact(&self) -> bool {
        self.digest == self.digest()
    }
}

/// The name a variant's scores go under.
pub fn variant_name(v: Variant) -> &'static str {
    match v {
        Variant::Unedited => "unedited",
        Variant::Edited => "edited",
        Variant::Oracle => "oracle",
    }
}

/// The share of images that went the way an edit wants: sources and
/// positives to the destination-style prompt (B), negatives to their own (A).
pub fn score(prompts: &[PromptResult], variant: Variant) -> Scores {
    let share = |set: Set, want: Pick| {
        let picks: Vec<_> = prompts
            .iter()
            .filter(|p| p.variant == variant && p.set == set)
            .flat_map(|p| &p.picks)
            .collect();
        let hits = picks.iter().filter(|p| ***p == Some(want)).count();
        hits as f64 / picks.len().max(1) as f64
    };
    Scores {
        efficacy: share(Set::Source, Pick::B),
        generality: share(Set::Positive, Pick::B),
        specificity: share(Set::Negative, Pick::A),
    }
}

/// Mean scores over rows, per variant.
pub fn average(rows: &[RowResult]) -> BTreeMap<String, Scores> {
    ["unedited", "edited", "oracle"]
        .into_iter()
        .map(|v| {
            (
                v.to_string(),
                Scores::mean(rows.iter().filter_map(|r| r.scores.get(v))),
            )
        })
        .collect()
}

/// The report's files: `results.json` and `report.md`, with their texts.
pub fn render(report: &Report) -> Result<[(&'static str, String); 2], ReportError> {
    let json = serde_json::to_string_pretty(report).map_err(ReportError::Serialise)?;
    Ok([("results.json", json), ("report.md", markdown(report))])
}

/// Writes `results.json` and `report.md` into `dir`, each whole or not at all.
pub fn save(dir: &Path, report: &Report) -> Result<(), ReportError> {
    use std::io::Write;
    for (name, text) in render(report)? {
        let path = dir.join(name);
        crate::staged::write_file(&path, |w| w.write_all(text.as_bytes()))
            .map_err(|source| ReportError::Io { path, source })?;
    }
    Ok(())
}

/// Reads a `results.json`.
pub fn read(path: &Path) -> Result<Report, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ReportError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// The report as the paper's table: one line per row and variant, then the means.
pub fn markdown(report: &Report) -> String {
    let s = &report.settings;
    let mut out = format!(
        "# TIME evaluation\n\n{} on `{}`, dataset `{}`: {} seeds per prompt, {} {} steps, guidance {}, \
         λ = {}, classifier `{}`.\n\n\
         Efficacy: source-prompt images classified as the destination; generality: positives \
         classified as their destination-style prompt; specificity: negatives classified as \
         themselves. Oracle: the unedited model given the destination-style prompts (negatives \
         unchanged).\n\n\
         | row | edit | model | efficacy | generality | specificity |\n|---|---|---|---:|---:|---:|\n",
        s.tool,
        s.model,
        s.dataset,
        s.seeds,
        s.steps,
        s.scheduler,
        s.guidance,
        s.lambda,
        s.classifier
    );
    let pct = |v: f64| format!("{:.1}%", 100.0 * v);
    for r in &report.rows {
        for (k, v) in ["unedited", "edited", "oracle"]
            .iter()
            .filter_map(|k| Some((k, r.scores.get(*k)?)))
        {
            out.push_str(&format!(
                "| {} | {} → {} | {k} | {} | {} | {} |\n",
                r.index,
                r.old,
                r.new,
                pct(v.efficacy),
                pct(v.generality),
                pct(v.specificity)
            ));
        }
    }
    out.push_str("\n**Mean over rows**\n\n| model | efficacy | generality | specificity |\n|---|---:|---:|---:|\n");
    for (k, v) in &report.average {
        out.push_str(&format!(
            "| {k} | {} | {} | {} |\n",
            pct(v.efficacy),
            pct(v.generality),
            pct(v.specificity)
        ));
    }
    out.push_str(
        "\nGrids: `row-NN.png`, one line per prompt (source, positives, negatives), captioned \
                  with it, the first seeds unedited on the left, edited on the right.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cut_the_rows_into_contiguous_nonempty_slices() {
        for n in 1..=9 {
            for count in 1..=n {
                let cut: Vec<Shard> = (0..count)
                    .map(|k| Shard::of(3..3 + n, k, count).unwrap())
                    .collect();
                assert_eq!(cut[0].rows[0], 3);
                assert_eq!(cut[count - 1].rows[1], 3 + n);
                for pair in cut.windows(2) {
                    assert_eq!(pair[0].rows[1], pair[1].rows[0]);
                }
                let sizes: Vec<usize> = cut.iter().map(|s| s.rows().len()).collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(*lo >= 1 && hi - lo <= 1, "{n} rows in {count}: {sizes:?}");
            }
            assert!(Shard::of(0..n, 0, n + 1).is_none());
            assert!(Shard::of(0..n, n, n).is_none());
        }
    }
}
