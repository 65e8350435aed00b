//! `estimate-memory`: Accelerate's table of what a model needs to load and to train with Adam, per dtype.

use super::device_map::get_max_layer_size;
use super::skeleton::ModelSkeleton;
use std::collections::BTreeMap;

/// The model's total size and its largest layer (size and names), Accelerate's
/// `calculate_maximum_sizes`.
pub fn calculate_maximum_sizes(
    model: &ModelSkeleton,
    no_split: &[String],
) -> (u64, (u64, Vec<String>)) {
    let sizes = model.module_sizes(None, &BTreeMap::new());
    let root = model.direct_tensors("");
    let mut items: Vec<String> = root
        .iter()
        .filter(|(_, b)| !b)
        .map(|(n, _)| n.clone())
        .collect();
    items.extend(model.children(""));
    items.extend(root.iter().filter(|(_, b)| *b).map(|(n, _)| n.clone()));
    (
        sizes.get("").copied().unwrap_or(0),
        get_max_layer_size(model, &items, &sizes, no_split),
    )
}

/// The most memory training with Adam needs for a model of `bytes` (fp32) in `dtype`, or `None` for
/// dtypes that are not trained (int8, int4): 4× the model in fp32 (model, gradients, two Adam states);
/// 2× in fp16/bf16 (Accelerate's `estimate_training_usage`, whose largest term is the optimizer states).
pub fn estimate_training_usage(bytes: u64, dtype: &str) -> Option<u64> {
    match dtype {
        "float32" => Some(bytes * 4),
        "float16" | "bfloat16" => Some((bytes * 2).max(bytes + bytes / 2)),
        _ => None,
    }
}

/// Python's `round(x, 2)` printed as Python prints floats.
fn py_round(x: f64) -> String {
    let r = (x * 100.0).round() / 100.0;
    let s = format!("{r:.2}");
    let s = s.trim_end_matches('0');
    if s.ends_with('.') {
        format!("{s}0")
    } else {
        s.to_owned()
    }
}

/// Accelerate's `convert_bytes`: the largest unit below 1024, two decimals at most. `exact` marks an
/// integer that has not been divided yet (printed without decimals, as Python prints an int).
pub fn convert_bytes(size: f64, exact: bool) -> String {
    let mut size = size;
    for unit in ["bytes", "KB", "MB", "GB", "TB"] {
        if size < 1024.0 {
            return if exact && unit == "bytes" {
                format!("{} {unit}", size as u64)
            } else {
                format!("{} {unit}", py_round(size))
            };
        }
        size /= 1024.0;
    }
    format!("{} PB", py_round(size))
}

/// Accelerate's ASCII table: a title, then one row per dtype with the largest layer, the total size and
/// the memory to train with Adam.
pub fn estimate_memory_table(
    model: &ModelSkeleton,
    no_split: &[String],
    title: &str,
    dtypes: &[&str],
) -> String {
    let (total, (largest, _)) = calculate_maximum_sizes(model, no_split);
    let rows: Vec<Vec<String>> = dtypes
        .iter()
        .map(|dtype| {
            let divisor = match *dtype {
                "float16" | "bfloat16" => 2.0,
                "int8" => 4.0,
                "int4" => 8.0,
                _ => 1.0,
            };
            let exact = divisor == 1.0;
            vec![
                (*dtype).to_owned(),
                convert_bytes(largest as f64 / divisor, exact),
                convert_bytes(total as f64 / divisor, exact),
                estimate_training_usage(total, dtype)
                    .map_or_else(|| "N/A".to_owned(), |b| convert_bytes(b as f64, true)),
            ]
        })
        .collect();
    ascii_table(
        &[
            "dtype",
            "Largest Layer",
            "Total Size",
            "Training using Adam",
        ],
        &rows,
        title,
    )
}

fn center(text: &str, width: usize) -> String {
    // Python's str.center puts an odd padding's extra space on the left only when the target width is odd;
    // Accelerate's table relies on that, so reproduce it exactly.
    let len = text.chars().count();
    if width <= len {
        return text.to_owned();
    }
    let pad = width - len;
    let left = pad / 2 + (pad & width & 1);
    format!("{}{text}{}", " ".repeat(left), " ".repeat(pad - left))
}

fn ascii_table(headers: &[&str], rows: &[Vec<String>], title: &str) -> String {
    let mut widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain(std::iter::once(headers[i].chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |l: &str, m: &str, r: &str, widths: &[usize], extra: usize| {
        format!(
            "{l}{}{}{r}",
            widths
                .iter()
                .map(|w| "─".repeat(*w))
                .collect::<Vec<_>>()
                .join(m),
            "─".repeat(extra)
        )
    };
    let mut diff = 0;
    let separator = line("├", "┼", "┤", &widths, 0);
    let title_len = title.chars().count();
    if title_len > widths.iter().sum::<usize>() {
        diff = title_len.abs_diff(separator.chars().count());
        if let Some(last) = widths.last_mut() {
            *last += diff;
        }
    }
    let separator = line("├", "┼", "┤", &widths, diff);
    let mut out = String::new();
    out.push_str(&line("┌", "─", "┐", &widths, diff));
    out.push('\n');
    out.push_str(&format!(
        "│{}│\n",
        center(title, separator.chars().count() - 2)
    ));
    out.push_str(&line("├", "┬", "┤", &widths, diff));
    out.push('\n');
    if let Some(last) = widths.last_mut() {
        *last += diff;
    }
    let row = |cells: &[String]| {
        format!(
            "│{}│",
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| center(c, widths[i]))
                .collect::<Vec<_>>()
                .join("│")
        )
    };
    out.push_str(&row(&headers
        .iter()
        .map(|h| (*h).to_owned())
        .collect::<Vec<_>>()));
    out.push('\n');
    out.push_str(&separator);
    out.push('\n');
    for r in rows {
        out.push_str(&row(r));
        out.push('\n');
    }
    out.push_str(&format!(
        "└{}┘",
        widths
            .iter()
            .map(|w| "─".repeat(*w))
            .collect::<Vec<_>>()
            .join("┴")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn sizes_print_like_accelerate() {
        assert_eq!(convert_bytes(236.0, true), "236 bytes");
        assert_eq!(convert_bytes(118.0, false), "118.0 bytes");
        assert_eq!(convert_bytes(1536.0, true), "1.5 KB");
        assert_eq!(convert_bytes(89_075_712.0, true), "84.95 MB");
        assert_eq!(convert_bytes(433_245_184.0 * 4.0, true), "1.61 GB");
        assert_eq!(convert_bytes(1024.0 * 1024.0, true), "1.0 MB");
    }

    #[test]
    fn python_center() {
        assert_eq!(center("ab", 5), "  ab ");
        assert_eq!(center("abc", 6), " abc  ");
        assert_eq!(center("abc", 4), "abc ");
        assert_eq!(center("ab", 6), "  ab  ");
    }

    #[test]
    fn a_table_for_a_block_model() {
        let mut model = ModelSkeleton::new();
        for i in 0..4 {
            model = model
                .param(&format!("{i}.up.weight"), &[1024, 256], Kind::Float)
                .param(&format!("{i}.down.weight"), &[256, 1024], Kind::Float)
                .class(&i.to_string(), "Block");
        }
        let (total, (largest, names)) = calculate_maximum_sizes(&model, &["Block".into()]);
        assert_eq!(total, 4 * 2 * 1024 * 256 * 4);
        assert_eq!((largest, names.len()), (2 * 1024 * 256 * 4, 4));
        let table = estimate_memory_table(
            &model,
            &["Block".into()],
            "Memory Usage for loading `blocks`",
            &["float32", "float16", "int8", "int4"],
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].contains("Memory Usage for loading `blocks`"),
            "{table}"
        );
        assert!(
            lines[3].contains("dtype") && lines[3].contains("Training using Adam"),
            "{table}"
        );
        assert!(
            lines[5].contains("float32")
                && lines[5].contains("2.0 MB")
                && lines[5].contains("8.0 MB")
                && lines[5].contains("32.0 MB"),
            "{table}"
        );
        assert!(
            lines[6].contains("float16")
                && lines[6].contains("1.0 MB")
                && lines[6].contains("4.0 MB")
                && lines[6].contains("16.0 MB"),
            "{table}"
        );
        assert!(
            lines[8].contains("int4") && lines[8].contains("N/A"),
            "{table}"
        );
        // Every line has the same width.
        let widths: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
        assert!(widths.iter().all(|w| *w == widths[0]), "{table}");
    }
}
