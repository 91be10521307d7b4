//! `eval --shard K/N` and `eval --merge`: shards of an evaluation, made in
//! any order, from copies of the inputs at other paths, merge into exactly
//! the report one run over every row writes; anything else is refused by
//! name.

use std::path::{Path, PathBuf};

use serde_json::Value;
use time_onnx::eval::report;
use time_onnx::workflow::eval::{EvalJobError, EvalRequest, run};
use time_onnx::workflow::merge::{self, MergeError, MergeRequest};

mod common;

fn toy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/toy")
}

fn request(model: &Path, dataset: &str, out: &Path) -> EvalRequest {
    let mut req = common::eval_request(model, &toy().join(dataset), out);
    // One thread each: shards run side by side in some tests.
    req.session.threads = Some(1);
    req
}

/// Runs shard `k` of `n` of `req` into `dir`.
fn shard(req: &EvalRequest, k: usize, n: usize, dir: &Path) -> PathBuf {
    let req = EvalRequest {
        shard: Some((k, n)),
        output: dir.to_path_buf(),
        ..req.clone()
    };
    run(&req, &mut |_, _| {}).unwrap();
    dir.to_path_buf()
}

fn merge(shards: &[PathBuf], output: &Path) -> Result<report::Report, MergeError> {
    merge::run(&MergeRequest {
        shards: shards.to_vec(),
        output: output.to_path_buf(),
    })
}

/// A results.json as JSON, without its timing fields.
fn untimed(dir: &Path) -> Value {
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    for row in v["rows"].as_array_mut().unwrap() {
        row.as_object_mut().unwrap().remove("seconds").unwrap();
    }
    v
}

/// Every file but results.json, byte for byte.
fn assert_same_files(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut n: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(a), names(b));
    for name in names(a).iter().filter(|n| *n != "results.json") {
        assert!(
            std::fs::read(a.join(name)).unwrap() == std::fs::read(b.join(name)).unwrap(),
            "{name} differs"
        );
    }
}

#[test]
fn shards_from_copies_elsewhere_merge_into_the_single_run_report() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let req = request(&toy(), "toy_timed.csv", &t.join("single"));
    run(&req, &mut |_, _| {}).unwrap();

    // Shard 1 runs on "another machine": the model copied to another path.
    let copy = t.join("elsewhere/toy");
    copy_tree(&toy(), &copy);
    let elsewhere = EvalRequest {
        model: copy,
        ..req.clone()
    };
    let shards = vec![
        shard(&req, 2, 3, &t.join("s2")),
        shard(&elsewhere, 1, 3, &t.join("s1")),
        shard(&req, 0, 3, &t.join("s0")),
    ];
    let merged = merge(&shards, &t.join("merged")).unwrap();
    assert_eq!(merged.rows.len(), 6);
    assert_eq!(untimed(&t.join("merged")), untimed(&t.join("single")));
    assert_same_files(&t.join("merged"), &t.join("single"));
}

#[test]
fn all_at_once_shards_share_the_whole_solve() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let req = EvalRequest {
        all_at_once: true,
        ..request(&toy(), "toy_three.csv", &t.join("single"))
    };
    run(&req, &mut |_, _| {}).unwrap();
    let shards: Vec<PathBuf> = (0..3)
        .map(|k| shard(&req, k, 3, &t.join(format!("s{k}"))))
        .collect();
    merge(&shards, &t.join("merged")).unwrap();
    assert_eq!(untimed(&t.join("merged")), untimed(&t.join("single")));
    assert_same_files(&t.join("merged"), &t.join("single"));
}

/// A copy of `from` (files and folders) at `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

#[test]
fn merge_refuses_what_is_not_the_same_whole_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let req = request(&toy(), "toy_timed.csv", &t.join("unused"));
    let rows = EvalRequest {
        rows: Some(0..3),
        ..req.clone()
    };
    let good: Vec<PathBuf> = (0..3)
        .map(|k| shard(&rows, k, 3, &t.join(format!("s{k}"))))
        .collect();
    let out = t.join("merged");
    let refused = |shards: &[PathBuf]| {
        let err = merge(shards, &out).unwrap_err();
        assert!(!out.exists(), "{err}: something was written");
        err.to_string()
    };
    let with = |k: usize, other: &Path| {
        let mut s = good.clone();
        s[k] = other.to_path_buf();
        s
    };

    let err = refused(&good[..2]);
    assert!(err.contains("missing shards (of 3): 2"), "{err}");
    let err = refused(&[good[0].clone(), good[1].clone(), good[1].clone()]);
    assert!(err.contains("shard 1/3 is given twice"), "{err}");

    // Made with other settings: named. Steps differ; so does the model's content.
    let steps = shard(
        &EvalRequest {
            steps: 4,
            ..rows.clone()
        },
        2,
        3,
        &t.join("steps"),
    );
    let err = refused(&with(2, &steps));
    assert!(err.contains("steps: 3 vs 4"), "{err}");
    let changed = t.join("changed-model");
    copy_tree(&toy(), &changed);
    let scheduler = changed.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&scheduler).unwrap();
    std::fs::write(&scheduler, format!("{text}\n")).unwrap();
    let other_model = shard(
        &EvalRequest {
            model: changed,
            ..rows.clone()
        },
        1,
        3,
        &t.join("other-model"),
    );
    let err = refused(&with(1, &other_model));
    assert!(err.contains("inputs.model: "), "{err}");
    // Cut differently: shard 1 of 2 of the same rows.
    let halves = shard(&rows, 1, 2, &t.join("halves"));
    let err = refused(&with(1, &halves));
    assert!(
        err.contains("shards: 3 shards of rows 0..3 vs 2 shards"),
        "{err}"
    );
    // Not a shard.
    run(
        &EvalRequest {
            output: t.join("whole"),
            ..rows.clone()
        },
        &mut |_, _| {},
    )
    .unwrap();
    let err = refused(&with(0, &t.join("whole")));
    assert!(err.contains("is not a shard"), "{err}");

    // Changed on disk after it was written.
    let bad = t.join("edited");
    copy_tree(&good[1], &bad);
    let json = std::fs::read_to_string(bad.join("results.json")).unwrap();
    let flipped = json.replacen("\"A\"", "\"B\"", 1);
    assert_ne!(flipped, json);
    std::fs::write(bad.join("results.json"), flipped).unwrap();
    let err = refused(&with(1, &bad));
    assert!(err.contains("digest does not match"), "{err}");
    // Cut short.
    let cut = t.join("cut");
    copy_tree(&good[1], &cut);
    std::fs::write(cut.join("results.json"), &json.as_bytes()[..json.len() / 2]).unwrap();
    let err = refused(&with(1, &cut));
    assert!(err.contains("not a whole report"), "{err}");
    // A grid missing, or another image in its place.
    let grids = t.join("grids");
    copy_tree(&good[1], &grids);
    std::fs::remove_file(grids.join("row-01.png")).unwrap();
    let err = refused(&with(1, &grids));
    assert!(err.contains("row-01.png: missing"), "{err}");
    std::fs::copy(good[0].join("row-00.png"), grids.join("row-01.png")).unwrap();
    let err = refused(&with(1, &grids));
    assert!(err.contains("row-01.png: changed"), "{err}");

    // A shard stopped before its last row (here: its row taken out, the digest redone).
    let short = t.join("short");
    copy_tree(&good[2], &short);
    let mut r = report::read(&short.join("results.json")).unwrap();
    r.rows.clear();
    r.seal();
    report::save(&short, &r).unwrap();
    let err = refused(&with(2, &short));
    assert!(err.contains("holds 0 of shard 2/3's 1 rows"), "{err}");

    // The good ones merge, and not over an existing report.
    merge(&good, &out).unwrap();
    let err = merge(&good, &out).unwrap_err();
    assert!(matches!(err, MergeError::ReportExists(_)), "{err}");
}

#[test]
fn a_shard_resumes_only_as_the_same_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let req = request(&toy(), "toy_timed.csv", &dir);
    shard(&req, 0, 6, &dir);
    let err = run(
        &EvalRequest {
            shard: Some((1, 6)),
            resume: true,
            ..req.clone()
        },
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, EvalJobError::OtherSettings { .. }), "{err}");
    let err = run(
        &EvalRequest {
            shard: Some((6, 6)),
            ..req.clone()
        },
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, EvalJobError::Shard { .. }), "{err}");
}
