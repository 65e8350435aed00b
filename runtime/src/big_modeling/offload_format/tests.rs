//! The offload folder, byte for byte as Accelerate 1.15 writes and reads it. Every expected value here
//! comes from running Accelerate 1.15.0 (torch 2.11): `tests/python/oracle/oracle_bigmodel_offload.py` and its
//! output.

use super::*;
use crate::layers;
use tch::nn;

/// `offload_state_dict(folder, M().state_dict())` in Accelerate: index.json, verbatim (no newline at the
/// end).
const ACCELERATE_INDEX: &str = r#"{
  "half_b": {
    "dtype": "bfloat16",
    "shape": [
      3
    ]
  },
  "scalar_f": {
    "dtype": "float32",
    "shape": []
  },
  "ints": {
    "dtype": "int32",
    "shape": [
      3
    ]
  },
  "mask": {
    "dtype": "bool",
    "shape": [
      3
    ]
  },
  "u8": {
    "dtype": "uint8",
    "shape": [
      1,
      2
    ]
  },
  "f16": {
    "dtype": "float16",
    "shape": [
      1
    ]
  },
  "f64": {
    "dtype": "float64",
    "shape": [
      1,
      2
    ]
  },
  "lin.weight": {
    "dtype": "float32",
    "shape": [
      2,
      3
    ]
  },
  "lin.bias": {
    "dtype": "float32",
    "shape": [
      2
    ]
  },
  "bn.weight": {
    "dtype": "float32",
    "shape": [
      2
    ]
  },
  "bn.bias": {
    "dtype": "float32",
    "shape": [
      2
    ]
  },
  "bn.running_mean": {
    "dtype": "float32",
    "shape": [
      2
    ]
  },
  "bn.running_var": {
    "dtype": "float32",
    "shape": [
      2
    ]
  },
  "bn.num_batches_tracked": {
    "dtype": "int64",
    "shape": []
  }
}"#;

/// The `.dat` files Accelerate wrote for that state dict, as hex.
const ACCELERATE_FILES: [(&str, &str); 14] = [
    ("half_b", "c03f00c05040"),
    ("scalar_f", "00002040"),
    ("ints", "01000000feffffff03000000"),
    ("mask", "010001"),
    ("u8", "07ff"),
    ("f16", "0038"),
    ("f64", "000000000000f03f0000000000000040"),
    (
        "lin.weight",
        "e8a38dbb13939e3e7e4bf3bec98bd9beb1b463be53891e3e",
    ),
    ("lin.bias", "406b3bbc7a61ea3e"),
    ("bn.weight", "0000803f0000803f"),
    ("bn.bias", "0000000000000000"),
    ("bn.running_mean", "0000000000000000"),
    ("bn.running_var", "0000803f0000803f"),
    ("bn.num_batches_tracked", "0700000000000000"),
];

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn unhex(text: &str) -> Vec<u8> {
    data_encoding::HEXLOWER.decode(text.as_bytes()).unwrap()
}

fn cpu(kind: Kind) -> (Kind, Device) {
    (kind, Device::Cpu)
}

/// The state dict of the oracle's model M, in its order (the random Linear values from the bytes
/// Accelerate wrote).
fn oracle_state() -> Vec<(String, Tensor)> {
    let from_bytes = |h: &str, shape: &[i64]| {
        Tensor::from_slice(&unhex(h))
            .view_dtype(Kind::Float)
            .reshape(shape)
    };
    vec![
        (
            "half_b".into(),
            Tensor::from_slice(&[1.5f32, -2.0, 3.25]).to_kind(Kind::BFloat16),
        ),
        ("scalar_f".into(), Tensor::from(2.5f32)),
        ("ints".into(), Tensor::from_slice(&[1i32, -2, 3])),
        ("mask".into(), Tensor::from_slice(&[true, false, true])),
        ("u8".into(), Tensor::from_slice(&[7u8, 255]).reshape([1, 2])),
        (
            "f16".into(),
            Tensor::from_slice(&[0.5f32]).to_kind(Kind::Half),
        ),
        (
            "f64".into(),
            Tensor::from_slice(&[1.0f64, 2.0]).reshape([1, 2]),
        ),
        (
            "lin.weight".into(),
            from_bytes(ACCELERATE_FILES[7].1, &[2, 3]),
        ),
        ("lin.bias".into(), from_bytes(ACCELERATE_FILES[8].1, &[2])),
        ("bn.weight".into(), Tensor::ones([2], cpu(Kind::Float))),
        ("bn.bias".into(), Tensor::zeros([2], cpu(Kind::Float))),
        (
            "bn.running_mean".into(),
            Tensor::zeros([2], cpu(Kind::Float)),
        ),
        ("bn.running_var".into(), Tensor::ones([2], cpu(Kind::Float))),
        ("bn.num_batches_tracked".into(), Tensor::from(7i64)),
    ]
}

#[test]
fn a_state_dict_is_written_as_accelerate_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("off");
    offload_state_dict(&folder, &oracle_state()).unwrap();
    assert_eq!(
        std::fs::read_to_string(folder.join("index.json")).unwrap(),
        ACCELERATE_INDEX
    );
    for (name, want) in ACCELERATE_FILES {
        let bytes = std::fs::read(folder.join(format!("{name}.dat"))).unwrap();
        assert_eq!(hex(&bytes), want, "{name}.dat");
    }
}

#[test]
fn an_accelerate_folder_reads_back_with_its_dtypes_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path();
    std::fs::write(folder.join("index.json"), ACCELERATE_INDEX).unwrap();
    for (name, bytes) in ACCELERATE_FILES {
        std::fs::write(folder.join(format!("{name}.dat")), unhex(bytes)).unwrap();
    }
    // Accelerate's load_offloaded_weight gave back every tensor equal to the original, 0-d ones as 0-d.
    for (name, original) in oracle_state() {
        let back = load_offloaded_weight(folder, &name).unwrap();
        assert_eq!(back.kind(), original.kind(), "{name}");
        assert_eq!(back.size(), original.size(), "{name}");
        assert!(back.equal(&original), "{name}");
    }
    assert_eq!(
        load_offloaded_weight(folder, "bn.num_batches_tracked")
            .unwrap()
            .size(),
        Vec::<i64>::new()
    );
    // The index keeps the file's order.
    let (_, index) = read_offload_index(folder).unwrap();
    let names: Vec<&str> = index.iter().map(|(n, _)| n.as_str()).collect();
    let want: Vec<&str> = ACCELERATE_FILES.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, want);

    // Into a model: 0-d variables (a batch norm's counter) get 0-d values.
    let vs = VarStore::new(Device::Cpu);
    let bn = vs.root() / "bn";
    let _w = bn.var("weight", &[2], nn::Init::Const(0.0));
    let counter = bn.add("num_batches_tracked", Tensor::from(0i64), false);
    let restored = load_offloaded_weights(&vs, folder).unwrap();
    assert_eq!(restored, ["bn.weight", "bn.num_batches_tracked"]);
    assert_eq!(counter.size(), Vec::<i64>::new());
    assert_eq!(counter.int64_value(&[]), 7);
}

#[test]
fn zero_d_tensors_fp8_and_index_updates() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("direct");
    let mut index = OffloadIndex::new();
    let scalars = [
        ("zero_d_i64", Tensor::from(7i64), "0700000000000000"),
        ("zero_d_f32", Tensor::from(2.5f32), "00002040"),
        (
            "zero_d_bf16",
            Tensor::from(1.5f32).to_kind(Kind::BFloat16),
            "c03f",
        ),
        ("zero_d_bool", Tensor::from(true), "01"),
    ];
    for (name, t, _) in &scalars {
        offload_weight(t, name, &folder, Some(&mut index)).unwrap();
    }
    // Accelerate's index dict: {'zero_d_i64': {'dtype': 'int64', 'shape': []}, 'zero_d_f32': {'dtype':
    // 'float32', 'shape': []}, 'zero_d_bf16': {'dtype': 'bfloat16', 'shape': []}, 'zero_d_bool':
    // {'dtype': 'bool', 'shape': []}}
    let want: OffloadIndex = [
        ("zero_d_i64", "int64"),
        ("zero_d_f32", "float32"),
        ("zero_d_bf16", "bfloat16"),
        ("zero_d_bool", "bool"),
    ]
    .iter()
    .map(|(n, d)| ((*n).to_owned(), json!({"dtype": d, "shape": []})))
    .collect();
    assert_eq!(index, want);
    save_offload_index(&index, &folder).unwrap();
    for (name, t, bytes) in &scalars {
        assert_eq!(
            hex(&std::fs::read(folder.join(format!("{name}.dat"))).unwrap()),
            *bytes
        );
        let back = load_offloaded_weight(&folder, name).unwrap();
        assert_eq!(back.size(), Vec::<i64>::new(), "{name} reads back 0-d");
        assert!(back.equal(t), "{name}");
    }
    // Without an index only the file is written.
    offload_weight(&Tensor::ones([2], cpu(Kind::Float)), "noidx", &folder, None).unwrap();
    assert!(folder.join("noidx.dat").is_file());

    // An update keeps the positions of the keys already there and appends the new ones (Accelerate's
    // output, verbatim).
    let update: OffloadIndex = vec![
        (
            "zero_d_f32".into(),
            json!({"dtype": "float32", "shape": [1]}),
        ),
        ("new".into(), json!({"dtype": "int8", "shape": [2]})),
    ];
    save_offload_index(&update, &folder).unwrap();
    assert_eq!(
        std::fs::read_to_string(folder.join("index.json")).unwrap(),
        "{\n  \"zero_d_i64\": {\n    \"dtype\": \"int64\",\n    \"shape\": []\n  },\n  \"zero_d_f32\": {\n    \
         \"dtype\": \"float32\",\n    \"shape\": [\n      1\n    ]\n  },\n  \"zero_d_bf16\": {\n    \"dtype\": \
         \"bfloat16\",\n    \"shape\": []\n  },\n  \"zero_d_bool\": {\n    \"dtype\": \"bool\",\n    \"shape\": \
         []\n  },\n  \"new\": {\n    \"dtype\": \"int8\",\n    \"shape\": [\n      2\n    ]\n  }\n}"
    );

    // An empty index writes no file.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    save_offload_index(&[], &empty).unwrap();
    offload_state_dict(&empty, &[]).unwrap();
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);

    // fp8 as int8 bits under the torch name: {'w8': {'dtype': 'float8_e4m3fn', 'shape': [2]}}, file 38c0.
    let f8 = dir.path().join("f8");
    let w8 = Tensor::from_slice(&[1.0f32, -2.0]).to_kind(Kind::Float8e4m3fn);
    let mut index = OffloadIndex::new();
    offload_weight(&w8, "w8", &f8, Some(&mut index)).unwrap();
    assert_eq!(
        index,
        vec![(
            "w8".to_owned(),
            json!({"dtype": "float8_e4m3fn", "shape": [2]})
        )]
    );
    assert_eq!(hex(&std::fs::read(f8.join("w8.dat")).unwrap()), "38c0");
    save_offload_index(&index, &f8).unwrap();
    let back = load_offloaded_weight(&f8, "w8").unwrap();
    assert_eq!(back.kind(), Kind::Float8e4m3fn);
    assert!(
        back.to_kind(Kind::Float)
            .equal(&Tensor::from_slice(&[1.0f32, -2.0]))
    );
    // e5m2 goes the same way, both directions.
    std::fs::write(
        f8.join("index.json"),
        r#"{"e5": {"dtype": "float8_e5m2", "shape": [2]}}"#,
    )
    .unwrap();
    let e5 = Tensor::from_slice(&[1.0f32, -2.0]).to_kind(Kind::Float8e5m2);
    offload_weight(&e5, "e5", &f8, None).unwrap();
    let back = load_offloaded_weight(&f8, "e5").unwrap();
    assert_eq!(back.kind(), Kind::Float8e5m2);
    assert!(back.to_kind(Kind::Float).equal(&e5.to_kind(Kind::Float)));
}

#[test]
fn shapes_against_file_sizes_and_safetensors_entries() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path();
    std::fs::write(folder.join("lin.bias.dat"), unhex(ACCELERATE_FILES[8].1)).unwrap();
    // Accelerate: shape [] on the 2-element file reads element 0 (tensor(-0.0114)); shape [3] on the
    // 8-byte file raises "mmap length is greater than file size".
    std::fs::write(
        folder.join("index.json"),
        r#"{"lin.bias": {"dtype": "float32", "shape": []}}"#,
    )
    .unwrap();
    let first = load_offloaded_weight(folder, "lin.bias").unwrap();
    assert_eq!(first.size(), Vec::<i64>::new());
    assert_eq!(first.double_value(&[]) as f32, -0.011_439_145);
    std::fs::write(
        folder.join("index.json"),
        r#"{"lin.bias": {"dtype": "float32", "shape": [3]}}"#,
    )
    .unwrap();
    let err = load_offloaded_weight(folder, "lin.bias")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lin.bias.dat") && err.contains("8 bytes"),
        "{err}"
    );

    // Entries pointing into a safetensors file, as transformers writes them (Accelerate's
    // OffloadedWeightsLoader gave x.weight = tensor([1., 2.], dtype=torch.float16) and b = tensor([3.])).
    let st = folder.join("w.safetensors");
    Tensor::write_safetensors(
        &[
            ("orig.w", Tensor::from_slice(&[1.0f32, 2.0])),
            ("b", Tensor::from_slice(&[3.0f32])),
        ],
        &st,
    )
    .unwrap();
    let index = json!({
        "x.weight": {"safetensors_file": st.to_str().unwrap(), "weight_name": "orig.w", "dtype": "float16"},
        "b": {"safetensors_file": st.to_str().unwrap()},
    });
    std::fs::write(folder.join("index.json"), index.to_string()).unwrap();
    let x = load_offloaded_weight(folder, "x.weight").unwrap();
    assert_eq!(x.kind(), Kind::Half);
    assert!(x.equal(&Tensor::from_slice(&[1.0f32, 2.0]).to_kind(Kind::Half)));
    let b = load_offloaded_weight(folder, "b").unwrap();
    assert!(b.equal(&Tensor::from_slice(&[3.0f32])));

    // A 0-d variable written as [1] by an older hasten still loads (Accelerate refuses the shape with
    // "Trying to set a tensor of shape torch.Size([1]) ..."); another shape is refused here too.
    std::fs::write(
        folder.join("index.json"),
        r#"{"n": {"dtype": "int64", "shape": [1]}, "v": {"dtype": "float32", "shape": [2]}}"#,
    )
    .unwrap();
    std::fs::write(folder.join("n.dat"), unhex("0700000000000000")).unwrap();
    std::fs::write(folder.join("v.dat"), unhex(ACCELERATE_FILES[8].1)).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let n = vs.root().add("n", Tensor::from(0i64), false);
    assert_eq!(load_offloaded_weights(&vs, folder).unwrap(), ["n"]);
    assert_eq!(n.int64_value(&[]), 7);
    let _v = vs.root().var("v", &[3], nn::Init::Const(0.0));
    let err = load_offloaded_weights(&vs, folder).unwrap_err().to_string();
    assert!(err.contains("[2]") && err.contains("[3]"), "{err}");
    assert!(!layers::is_empty_placeholder(&placeholder(
        &[],
        Kind::Int64
    )));
    assert_eq!(placeholder(&[], Kind::Int64).size(), Vec::<i64>::new());
}
