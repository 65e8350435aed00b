//! TensorBoard's on-disk format, written by hand: `Event` protocol buffers framed as TFRecords.
//!
//! Only the messages a training run logs are encoded (scalars, text, the hparams plugin's three summaries),
//! so a protobuf code generator and its build step are not worth their weight. Field numbers are those of
//! TensorFlow's `event.proto`, `summary.proto`, `tensor.proto` and TensorBoard's `hparams/*.proto`; the tests
//! and `tests/tracking.rs` read the files back with TensorBoard's own reader.

/// A protobuf message under construction: fields appended in any order (readers accept that).
#[derive(Default)]
pub(crate) struct Message(Vec<u8>);

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

impl Message {
    fn key(&mut self, field: u64, wire: u64) {
        varint(&mut self.0, (field << 3) | wire);
    }

    /// An integer field (int32, int64 or enum): negative values take ten bytes, as protobuf specifies.
    pub(crate) fn int(mut self, field: u64, value: i64) -> Self {
        self.key(field, VARINT);
        varint(&mut self.0, value as u64);
        self
    }

    pub(crate) fn boolean(self, field: u64, value: bool) -> Self {
        self.int(field, i64::from(value))
    }

    pub(crate) fn double(mut self, field: u64, value: f64) -> Self {
        self.key(field, FIXED64);
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub(crate) fn float(mut self, field: u64, value: f32) -> Self {
        self.key(field, FIXED32);
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub(crate) fn bytes(mut self, field: u64, value: &[u8]) -> Self {
        self.key(field, LEN);
        varint(&mut self.0, value.len() as u64);
        self.0.extend_from_slice(value);
        self
    }

    pub(crate) fn string(self, field: u64, value: &str) -> Self {
        self.bytes(field, value.as_bytes())
    }

    pub(crate) fn message(self, field: u64, value: Message) -> Self {
        self.bytes(field, &value.0)
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `Event { wall_time = 1; step = 2; file_version = 3 | summary = 5 }`.
pub(crate) fn event(wall_time: f64, step: i64) -> Message {
    Message::default().double(1, wall_time).int(2, step)
}

/// The first record of every event file: readers check it names format version 2.
pub(crate) fn file_version_event(wall_time: f64) -> Vec<u8> {
    event(wall_time, 0).string(3, "brain.Event:2").into_bytes()
}

/// An event carrying one `Summary { value = 1 }`.
pub(crate) fn summary_event(wall_time: f64, step: i64, values: Vec<Message>) -> Vec<u8> {
    let summary = values
        .into_iter()
        .fold(Message::default(), |s, v| s.message(1, v));
    event(wall_time, step).message(5, summary).into_bytes()
}

/// `Summary.Value { tag = 1; simple_value = 2 }`: what `add_scalar` writes.
pub(crate) fn scalar_value(tag: &str, value: f32) -> Message {
    Message::default().string(1, tag).float(2, value)
}

/// `SummaryMetadata { plugin_data = 1 { plugin_name = 1; content = 2 } }`.
fn plugin_metadata(plugin: &str, content: &[u8]) -> Message {
    let data = Message::default().string(1, plugin).bytes(2, content);
    Message::default().message(1, data)
}

/// What `add_text` writes: a string tensor of shape [1] under the text plugin, tagged `{tag}/text_summary`.
pub(crate) fn text_value(tag: &str, text: &str) -> Message {
    const DT_STRING: i64 = 7;
    let shape = Message::default().message(2, Message::default().int(1, 1));
    let tensor = Message::default()
        .int(1, DT_STRING)
        .message(2, shape)
        .bytes(8, text.as_bytes());
    Message::default()
        .string(1, &format!("{tag}/text_summary"))
        .message(9, plugin_metadata("text", &[]))
        .message(8, tensor)
}

/// A hyperparameter's value in the hparams plugin (`google.protobuf.Value`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum HParam {
    Number(f64),
    Text(String),
    Flag(bool),
}

impl HParam {
    /// `google.protobuf.Value { number_value = 2 | string_value = 3 | bool_value = 4 }`.
    fn value(&self) -> Message {
        match self {
            HParam::Number(x) => Message::default().double(2, *x),
            HParam::Text(s) => Message::default().string(3, s),
            HParam::Flag(b) => Message::default().boolean(4, *b),
        }
    }

    /// TensorBoard's `DataType`: STRING 1, BOOL 2, FLOAT64 3.
    fn data_type(&self) -> i64 {
        match self {
            HParam::Text(_) => 1,
            HParam::Flag(_) => 2,
            HParam::Number(_) => 3,
        }
    }
}

/// The hparams plugin's three summaries, as `SummaryWriter.add_hparams` writes them: the experiment (which
/// hyperparameters and metrics exist), the session start (their values) and the session end (success).
pub(crate) fn hparams_values(hparams: &[(String, HParam)], metrics: &[String]) -> Vec<Message> {
    // HParamsPluginData { version = 1; experiment = 2 | session_start_info = 3 | session_end_info = 4 }.
    let plugin = |field: u64, data: Message| {
        let content = Message::default()
            .int(1, 0)
            .message(field, data)
            .into_bytes();
        plugin_metadata("hparams", &content)
    };
    // Experiment { hparam_infos = 4 { name = 1; type = 4 }; metric_infos = 5 { name = 1 { tag = 2 } } }.
    let mut experiment = Message::default();
    for (name, v) in hparams {
        experiment =
            experiment.message(4, Message::default().string(1, name).int(4, v.data_type()));
    }
    for m in metrics {
        experiment = experiment.message(
            5,
            Message::default().message(1, Message::default().string(2, m)),
        );
    }
    // SessionStartInfo { hparams = 1 (map<string, Value>: entries { key = 1; value = 2 }) }.
    let mut start = Message::default();
    for (name, v) in hparams {
        start = start.message(1, Message::default().string(1, name).message(2, v.value()));
    }
    // SessionEndInfo { status = 1 } with STATUS_SUCCESS = 1.
    let end = Message::default().int(1, 1);
    let tagged =
        |tag: &str, metadata: Message| Message::default().string(1, tag).message(9, metadata);
    vec![
        tagged("_hparams_/experiment", plugin(2, experiment)),
        tagged("_hparams_/session_start_info", plugin(3, start)),
        tagged("_hparams_/session_end_info", plugin(4, end)),
    ]
}

/// One TFRecord: length, masked CRC-32C of the length, data, masked CRC-32C of the data.
pub(crate) fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli), bit by bit through a table built once: event files are small, speed is moot.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC catalogue's check value for CRC-32C over "123456789".
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_and_fixed_fields_encode_as_protobuf() {
        // From protobuf's encoding guide: field 1 = 150 is 08 96 01.
        assert_eq!(
            Message::default().int(1, 150).into_bytes(),
            [0x08, 0x96, 0x01]
        );
        // A negative int64 is ten bytes of two's complement.
        assert_eq!(Message::default().int(2, -1).into_bytes().len(), 11);
        assert_eq!(
            Message::default().string(2, "testing").into_bytes(),
            [0x12, 0x07, b't', b'e', b's', b't', b'i', b'n', b'g']
        );
        assert_eq!(
            Message::default().float(2, 1.0).into_bytes(),
            [0x15, 0, 0, 0x80, 0x3f]
        );
    }

    #[test]
    fn a_record_frames_its_data_with_length_and_checksums() {
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc(b"abc").to_le_bytes());
    }
}
