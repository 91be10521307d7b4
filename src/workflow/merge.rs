//! Merging an evaluation's shards (`eval --shard K/N` on many machines) into
//! the report one run over every row writes.
//!
//! Nothing is merged on trust: each shard's digest must match its contents
//! and its grids their recorded hashes, every shard must have been made with
//! the same settings, by content (paths differ between machines), and with
//! the same tool, every shard 0..N must be there once and complete. Then the
//! rows are put in dataset order and the means recomputed, so the numbers
//! are the single run's to the bit.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::eval::digest;
use crate::eval::report::{self, Report, ReportError, Shard};
use crate::staged::Staged;

/// The shards to merge and where the report goes.
#[derive(Clone, Debug)]
pub struct MergeRequest {
    /// The shards' report folders.
    pub shards: Vec<PathBuf>,
    /// The merged report's folder.
    pub output: PathBuf,
}

/// Why shards were not merged.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Nothing to merge.
    #[error("no shards given")]
    NoShards,
    /// A report that could not be read.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// A report of a whole evaluation, not of a shard.
    #[error("{} is not a shard (its evaluation was not cut into shards)", .0.display())]
    NotAShard(PathBuf),
    /// A report whose digest does not match what it says.
    #[error("{} was changed after it was written: its digest does not match its contents", .0.display())]
    Changed(PathBuf),
    /// A grid image missing or different from the one its report recorded.
    #[error("{}: {why}", .path.display())]
    Grid {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// A shard that stopped before its last row.
    #[error(
        "{} holds {have} of shard {index}/{count}'s {want} rows (rows {}..{}): finish it before merging",
        .path.display(), .rows.start, .rows.end
    )]
    Incomplete {
        /// Its folder.
        path: PathBuf,
        /// Its shard number.
        index: usize,
        /// Of how many.
        count: usize,
        /// Rows it holds.
        have: usize,
        /// Rows it should hold.
        want: usize,
        /// Which.
        rows: std::ops::Range<usize>,
    },
    /// Shards made differently.
    #[error("{} and {} were made differently: {differences}", .first.display(), .other.display())]
    Different {
        /// The first shard.
        first: PathBuf,
        /// The one that differs.
        other: PathBuf,
        /// In what, `field: first's vs other's`.
        differences: String,
    },
    /// One shard given twice.
    #[error("shard {index}/{count} is given twice: {} and {}", .first.display(), .second.display())]
    Twice {
        /// The shard.
        index: usize,
        /// Of how many.
        count: usize,
        /// One folder.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// Shards not given.
    #[error("missing shards (of {count}): {missing}")]
    Missing {
        /// Their numbers, as a list.
        missing: String,
        /// Of how many.
        count: usize,
    },
    /// A report exists where the merged one would go.
    #[error("{} exists", .0.display())]
    ReportExists(PathBuf),
    /// Writing the merged report.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One checked shard: its folder, report and shard description.
struct Part {
    dir: PathBuf,
    report: Report,
    shard: Shard,
}

/// Checks every shard and writes the merged `results.json`, `report.md` and
/// grids into `req.output`, together or not at all.
pub fn run(req: &MergeRequest) -> Result<Report, MergeError> {
    if req.shards.is_empty() {
        return Err(MergeError::NoShards);
    }
    let results = req.output.join("results.json");
    if results.exists() {
        return Err(MergeError::ReportExists(results));
    }
    let mut parts = req
        .shards
        .iter()
        .map(|dir| check(dir))
        .collect::<Result<Vec<_>, _>>()?;
    parts.sort_by_key(|p| p.shard.index);
    let first = &parts[0];
    for p in &parts[1..] {
        same_evaluation(first, p)?;
    }
    for pair in parts.windows(2) {
        if pair[0].shard.index == pair[1].shard.index {
            return Err(MergeError::Twice {
                index: pair[0].shard.index,
                count: pair[0].shard.count,
                first: pair[0].dir.clone(),
                second: pair[1].dir.clone(),
            });
        }
    }
    let count = first.shard.count;
    let missing: Vec<String> = (0..count)
        .filter(|k| !parts.iter().any(|p| p.shard.index == *k))
        .map(|k| k.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(MergeError::Missing {
            missing: missing.join(", "),
            count,
        });
    }

    let mut merged = Report::new(first.report.settings.clone(), None);
    merged.rows = parts.iter().flat_map(|p| p.report.rows.clone()).collect();
    merged.rows.sort_by_key(|r| r.index);
    merged.seal();
    write(req, &parts, &merged)?;
    Ok(merged)
}

/// A shard's report, read and checked on its own: intact, with the grids it
/// recorded, and every one of its rows.
fn check(dir: &Path) -> Result<Part, MergeError> {
    let path = dir.join("results.json");
    let report = report::read(&path)?;
    let Some(shard) = report.shard.clone() else {
        return Err(MergeError::NotAShard(dir.to_path_buf()));
    };
    if !report.intact() {
        return Err(MergeError::Changed(path));
    }
    let want = shard.rows();
    let have: Vec<usize> = report.rows.iter().map(|r| r.index).collect();
    if have != want.clone().collect::<Vec<_>>() {
        return Err(MergeError::Incomplete {
            path: dir.to_path_buf(),
            index: shard.index,
            count: shard.count,
            have: have.iter().filter(|i| want.contains(i)).count(),
            want: want.len(),
            rows: want,
        });
    }
    for row in &report.rows {
        let Some(hash) = &row.grid else { continue };
        let png = dir.join(grid_name(row.index));
        match digest::file(&png) {
            Ok(h) if &h == hash => {}
            Ok(_) => {
                return Err(MergeError::Grid {
                    path: png,
                    why: "changed since its report was written",
                });
            }
            Err(_) => {
                return Err(MergeError::Grid {
                    path: png,
                    why: "missing or unreadable",
                });
            }
        }
    }
    Ok(Part {
        dir: dir.to_path_buf(),
        report,
        shard,
    })
}

/// Two shards of one evaluation: the same settings by content, the same
/// tool, the same cut of the same rows.
fn same_evaluation(first: &Part, other: &Part) -> Result<(), MergeError> {
    let mut differences = first.report.settings.differences(&other.report.settings);
    let cut = |s: &Shard| format!("{} shards of rows {}..{}", s.count, s.range[0], s.range[1]);
    if (first.shard.count, first.shard.range) != (other.shard.count, other.shard.range) {
        differences.push(format!(
            "shards: {} vs {}",
            cut(&first.shard),
            cut(&other.shard)
        ));
    }
    if differences.is_empty() {
        return Ok(());
    }
    Err(MergeError::Different {
        first: first.dir.clone(),
        other: other.dir.clone(),
        differences: differences.join("; "),
    })
}

fn grid_name(row: usize) -> String {
    format!("row-{row:02}.png")
}

/// The grids, then `results.json` and `report.md`, staged and committed
/// together.
fn write(req: &MergeRequest, parts: &[Part], merged: &Report) -> Result<(), MergeError> {
    let mut staged = Staged::default();
    let mut put = |dest: PathBuf, bytes: &[u8]| -> Result<(), MergeError> {
        let io = |source| MergeError::Io {
            path: dest.clone(),
            source,
        };
        let tmp = staged.create(&dest).map_err(io)?;
        (&tmp.file).write_all(bytes).map_err(io)
    };
    for p in parts {
        for row in p.report.rows.iter().filter(|r| r.grid.is_some()) {
            let from = p.dir.join(grid_name(row.index));
            let bytes = std::fs::read(&from).map_err(|source| MergeError::Io {
                path: from.clone(),
                source,
            })?;
            // Read again after the check: the copy must be what was checked.
            if row.grid.as_deref() != Some(digest::bytes(&bytes).as_str()) {
                return Err(MergeError::Grid {
                    path: from,
                    why: "changed while merging",
                });
            }
            put(req.output.join(grid_name(row.index)), &bytes)?;
        }
    }
    for (name, text) in report::render(merged)? {
        put(req.output.join(name), text.as_bytes())?;
    }
    staged
        .commit()
        .map_err(|(path, source)| MergeError::Io { path, source })
}
