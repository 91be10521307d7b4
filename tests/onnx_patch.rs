//! Writing patched models: only the edited bytes change, the input is never
//! touched, external data moves beside the output.

use std::path::Path;

mod common;

use common::write_patched;
use prost::Message;
use time_onnx::onnx::patch::{TensorPatch, WriteError};
use time_onnx::onnx::proto::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};
use time_onnx::onnx::{Model, Storage};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn entry(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: k.into(),
        value: v.into(),
    }
}

fn inline(name: &str, data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![data.len() as i64],
        data_type: 1,
        raw_data: f32_bytes(data).into(),
        ..Default::default()
    }
}

fn external(name: &str, n: usize, offset: usize) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![n as i64],
        data_type: 1,
        data_location: 1,
        external_data: vec![
            entry("location", "weights.pb"),
            entry("offset", &offset.to_string()),
            entry("length", &(n * 4).to_string()),
        ],
        ..Default::default()
    }
}

fn save(path: &Path, initializer: Vec<TensorProto>) {
    let m = ModelProto {
        ir_version: 8,
        producer_name: "test".into(),
        graph: Some(GraphProto {
            name: "g".into(),
            initializer,
            ..Default::default()
        }),
        metadata_props: vec![entry("existing", "kept")],
        ..Default::default()
    };
    std::fs::write(path, m.encode_to_vec()).unwrap();
}

fn patch_for(model: &Model, name: &str, values: &[f32]) -> TensorPatch {
    let t = model
        .graph()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name == name)
        .unwrap();
    TensorPatch {
        tensor: model.tensor_info(t).unwrap(),
        data: f32_bytes(values),
    }
}

#[test]
fn inline_patch_changes_only_the_tensor_and_appends_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.onnx");
    save(
        &input,
        vec![inline("a", &[1.0, 2.0, 3.0]), inline("b", &[4.0, 5.0])],
    );
    let before = std::fs::read(&input).unwrap();

    let model = Model::open(&input).unwrap();
    let patch = patch_for(&model, "b", &[-4.0, -5.0]);
    let Storage::Inline { offset } = patch.tensor.storage else {
        panic!("inline expected")
    };
    let out = dir.path().join("out.onnx");
    write_patched(
        &model,
        &[patch],
        &[("time_onnx.edit.1".into(), "{}".into())],
        &out,
    )
    .unwrap();

    assert_eq!(std::fs::read(&input).unwrap(), before, "input modified");
    let after = std::fs::read(&out).unwrap();
    let off = offset as usize;
    assert_eq!(after[..off], before[..off]);
    assert_eq!(after[off..off + 8], f32_bytes(&[-4.0, -5.0])[..]);
    assert_eq!(after[off + 8..before.len()], before[off + 8..]);

    let decoded = ModelProto::decode(after.as_slice()).unwrap();
    let keys: Vec<_> = decoded
        .metadata_props
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    assert_eq!(keys, vec![("existing", "kept"), ("time_onnx.edit.1", "{}")]);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "temp files left: {leftovers:?}");
}

#[test]
fn external_patch_copies_data_beside_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let data: Vec<u8> = [
        f32_bytes(&[1.0, 2.0]),
        vec![9u8; 3],
        f32_bytes(&[3.0, 4.0, 5.0]),
    ]
    .concat();
    std::fs::write(src.join("weights.pb"), &data).unwrap();
    let input = src.join("model.onnx");
    save(
        &input,
        vec![
            external("x", 2, 0),
            inline("small", &[7.0]),
            external("y", 3, 11),
        ],
    );
    let before = std::fs::read(&input).unwrap();

    let model = Model::open(&input).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("edited.onnx");
    let patches = [
        patch_for(&model, "y", &[30.0, 40.0, 50.0]),
        patch_for(&model, "small", &[70.0]),
    ];
    let written = write_patched(&model, &patches, &[], &out).unwrap();
    assert_eq!(written.data_files, vec![out_dir.join("edited.onnx_data")]);

    assert_eq!(std::fs::read(&input).unwrap(), before);
    assert_eq!(std::fs::read(src.join("weights.pb")).unwrap(), data);
    let new_data = std::fs::read(out_dir.join("edited.onnx_data")).unwrap();
    assert_eq!(new_data[..11], data[..11]);
    assert_eq!(new_data[11..], f32_bytes(&[30.0, 40.0, 50.0])[..]);

    // The output decodes to the input with only locations and one raw_data changed.
    let mut a = ModelProto::decode(before.as_slice()).unwrap();
    let b = ModelProto::decode(std::fs::read(&out).unwrap().as_slice()).unwrap();
    for t in &mut a.graph.as_mut().unwrap().initializer {
        for e in &mut t.external_data {
            if e.key == "location" {
                e.value = "edited.onnx_data".into();
            }
        }
        if t.name == "small" {
            t.raw_data = f32_bytes(&[70.0]).into();
        }
    }
    assert_eq!(a, b);

    let reopened = Model::open(&out).unwrap();
    let y = reopened
        .graph()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name == "y")
        .unwrap()
        .clone();
    let info = reopened.tensor_info(&y).unwrap();
    assert_eq!(
        reopened.tensor_bytes(&info).unwrap().to_vec(),
        f32_bytes(&[30.0, 40.0, 50.0])
    );
}

#[test]
fn writing_over_the_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.onnx");
    save(&input, vec![inline("a", &[1.0])]);
    let before = std::fs::read(&input).unwrap();
    let model = Model::open(&input).unwrap();
    let patch = patch_for(&model, "a", &[2.0]);
    let err = write_patched(&model, &[patch], &[], &input).unwrap_err();
    assert!(matches!(err, WriteError::SameAsInput { .. }), "{err}");
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn wrong_length_replacement_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.onnx");
    save(&input, vec![inline("a", &[1.0, 2.0])]);
    let model = Model::open(&input).unwrap();
    let mut patch = patch_for(&model, "a", &[2.0, 3.0]);
    patch.data.pop();
    let out = dir.path().join("out.onnx");
    assert!(matches!(
        write_patched(&model, &[patch], &[], &out),
        Err(WriteError::LengthMismatch { .. })
    ));
    assert!(!out.exists());
}

#[test]
fn missing_output_folders_are_created_and_a_file_in_the_way_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.onnx");
    save(&input, vec![inline("a", &[1.0])]);
    let model = Model::open(&input).unwrap();
    let out = dir.path().join("missing/deeper/out.onnx");
    write_patched(&model, &[], &[], &out).unwrap();
    assert!(out.is_file());

    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let err = write_patched(&model, &[], &[], &blocker.join("out.onnx")).unwrap_err();
    assert!(matches!(err, WriteError::Io { .. }), "{err}");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"x");
}
