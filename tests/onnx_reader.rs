//! The ONNX reader on small models built here with our own schema: where
//! tensor bytes are found, and which malformed files are refused.

use std::path::Path;

use prost::Message;
use time_onnx::onnx::proto::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};
use time_onnx::onnx::{DataType, Model, OnnxError, Storage};

fn tensor(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        raw_data: data
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        ..Default::default()
    }
}

fn external(name: &str, dims: &[i64], location: &str, offset: u64, length: u64) -> TensorProto {
    let entry = |k: &str, v: String| StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        data_location: 1,
        external_data: vec![
            entry("location", location.into()),
            entry("offset", offset.to_string()),
            entry("length", length.to_string()),
        ],
        ..Default::default()
    }
}

fn write_model(path: &Path, initializer: Vec<TensorProto>) {
    let model = ModelProto {
        ir_version: 8,
        graph: Some(GraphProto {
            name: "g".into(),
            initializer,
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, model.encode_to_vec()).unwrap();
}

fn open_first(path: &Path) -> Result<Vec<u8>, OnnxError> {
    let m = Model::open(path)?;
    let t = &m.graph()?.initializer[0];
    let info = m.tensor_info(t)?;
    Ok(m.tensor_bytes(&info)?.to_vec())
}

#[test]
fn inline_raw_data_is_located_inside_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    let values = [1.5f32, -2.0, 3.25, 4.0, 5.0, 6.0];
    write_model(&path, vec![tensor("w", &[2, 3], &values)]);

    let m = Model::open(&path).unwrap();
    let info = m.tensor_info(&m.graph().unwrap().initializer[0]).unwrap();
    assert_eq!(info.dtype, DataType::Float);
    assert_eq!(info.shape, vec![2, 3]);
    assert_eq!(info.nbytes, 24);
    let Storage::Inline { offset } = info.storage else {
        panic!("expected inline storage")
    };
    let file = std::fs::read(&path).unwrap();
    let expected: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(&file[offset as usize..offset as usize + 24], &expected[..]);
    assert_eq!(m.tensor_bytes(&info).unwrap().to_vec(), expected);
}

#[test]
fn external_data_is_read_at_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![0xAAu8; 10];
    data.extend([7.0f32, 8.0].iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(dir.path().join("weights.pb"), &data).unwrap();
    let path = dir.path().join("m.onnx");
    write_model(&path, vec![external("w", &[2], "weights.pb", 10, 8)]);
    assert_eq!(open_first(&path).unwrap(), data[10..18].to_vec());
}

fn expect_location_refused(location: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    write_model(&path, vec![external("w", &[2], location, 0, 8)]);
    match open_first(&path) {
        Err(OnnxError::BadLocation { .. }) => {}
        other => panic!("location {location:?}: expected BadLocation, got {other:?}"),
    }
}

#[test]
fn absolute_external_location_is_refused() {
    expect_location_refused("/etc/passwd");
}

#[test]
fn external_location_leaving_the_folder_is_refused() {
    expect_location_refused("../../etc/passwd");
    expect_location_refused("sub/../../x");
}

#[test]
fn external_symlink_leaving_the_folder_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), [0u8; 8]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("weights.pb"))
        .unwrap();
    let path = dir.path().join("m.onnx");
    write_model(&path, vec![external("w", &[2], "weights.pb", 0, 8)]);
    assert!(matches!(
        open_first(&path),
        Err(OnnxError::BadLocation { .. })
    ));
}

#[test]
fn external_range_past_the_end_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("weights.pb"), [0u8; 12]).unwrap();
    let path = dir.path().join("m.onnx");
    write_model(&path, vec![external("w", &[2], "weights.pb", 8, 8)]);
    let err = open_first(&path).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
}

#[test]
fn inconsistent_tensor_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    let cases = [
        ("negative dimension", tensor("w", &[-1, 2], &[0.0; 2])),
        ("overflows", tensor("w", &[i64::MAX, i64::MAX], &[0.0; 2])),
        ("raw_data has 8 bytes", tensor("w", &[3], &[0.0; 2])),
        (
            "raw_data has 8 bytes",
            TensorProto {
                data_type: 11,
                ..tensor("w", &[2], &[0.0; 2])
            },
        ),
    ];
    for (why, t) in cases {
        write_model(&path, vec![t]);
        let err = open_first(&path).unwrap_err();
        assert!(
            matches!(err, OnnxError::BadTensor { .. }) && err.to_string().contains(why),
            "{why}: {err}"
        );
    }
}

#[test]
fn truncated_and_random_files_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    write_model(
        &path,
        vec![
            tensor("w", &[4, 4], &[1.0; 16]),
            tensor("b", &[4], &[2.0; 4]),
        ],
    );
    let full = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.onnx");
    for len in 0..full.len() {
        std::fs::write(&cut, &full[..len]).unwrap();
        // Either an error, or (at a message boundary) a valid shorter model.
        if let Ok(m) = Model::open(&cut)
            && let Ok(g) = m.graph()
        {
            for t in &g.initializer {
                let _ = m.tensor_info(t);
            }
        }
    }
    let mut state = 0x2545F4914F6CDD1Du64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&cut, &noise).unwrap();
    assert!(Model::open(&cut).is_err());
    std::fs::write(&cut, b"").unwrap();
    assert!(matches!(Model::open(&cut), Err(OnnxError::Empty { .. })));
}
