//! Pure helpers on cell text: completeness, hasten's magics, and Jupyter's cursor positions.

/// Whether a cell can run as it is (Jupyter's `is_complete_request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completeness {
    /// Brackets and literals are closed.
    Complete,
    /// Something is still open; the next line would be indented by this.
    Incomplete(String),
    /// A closing bracket without its opening one, or a mismatched pair.
    Invalid,
}

/// Tracks Rust brackets over rustc's own lexer (`ra_ap_rustc_lexer`, the one evcxr's analysis uses), so
/// brackets inside strings, chars and comments do not count. Not a parser: rustc has the last word; this
/// only tells a console whether Enter should run the cell or open a new line. evcxr's commands (lines
/// starting with `:`, e.g. `:dep x = { version = '1.0' }`) are not Rust and are left out.
pub fn completeness(code: &str) -> Completeness {
    use ra_ap_rustc_lexer::{
        FrontmatterAllowed, LiteralKind, RawStrError, TokenKind, tokenize, validate_raw_str,
    };
    let rust: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with(':'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut stack = Vec::new();
    let mut at = 0usize;
    for token in tokenize(&rust, FrontmatterAllowed::No) {
        let text = &rust[at..at + token.len as usize];
        at += token.len as usize;
        // A string or comment that later lines may still close makes the cell incomplete; a char or
        // byte literal ends at its line (rustc's lexer stops there), so an unclosed one is an error.
        let raw = |prefix: u32| match validate_raw_str(text, prefix) {
            Err(RawStrError::NoTerminator { .. }) => Some(Completeness::Incomplete(String::new())),
            Err(_) => Some(Completeness::Invalid),
            Ok(()) => None,
        };
        let verdict = match token.kind {
            TokenKind::BlockComment {
                terminated: false, ..
            } => Some(Completeness::Incomplete(String::new())),
            TokenKind::Literal { kind, .. } => match kind {
                LiteralKind::Str { terminated: false }
                | LiteralKind::ByteStr { terminated: false }
                | LiteralKind::CStr { terminated: false } => {
                    Some(Completeness::Incomplete(String::new()))
                }
                LiteralKind::Char { terminated: false }
                | LiteralKind::Byte { terminated: false } => Some(Completeness::Invalid),
                LiteralKind::RawStr { n_hashes: None } => raw(1),
                LiteralKind::RawByteStr { n_hashes: None }
                | LiteralKind::RawCStr { n_hashes: None } => raw(2),
                _ => None,
            },
            _ => None,
        };
        if let Some(verdict) = verdict {
            return verdict;
        }
        let open = match token.kind {
            TokenKind::OpenParen | TokenKind::OpenBracket | TokenKind::OpenBrace => {
                stack.push(token.kind);
                continue;
            }
            TokenKind::CloseParen => TokenKind::OpenParen,
            TokenKind::CloseBracket => TokenKind::OpenBracket,
            TokenKind::CloseBrace => TokenKind::OpenBrace,
            _ => continue,
        };
        if stack.pop() != Some(open) {
            return Completeness::Invalid;
        }
    }
    if stack.is_empty() {
        Completeness::Complete
    } else {
        Completeness::Incomplete("    ".repeat(stack.len()))
    }
}

/// A cell that is one of hasten's magics, translated to the Rust it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Magic {
    /// Rust code to run instead of the cell.
    Code(String),
    /// The magic is malformed: this message, shown as the cell's error.
    Usage(String),
}

const LAUNCH_USAGE: &str = "usage: %launch [-n N | --num_processes N] [--cpu] [--debug] \
[--mixed_precision no|fp16|bf16] FUNCTION [ARGS]\n\
  runs FUNCTION(ARGS) on N processes (default 2) through notebook_launcher; ARGS is one Rust \
expression (a tuple for several values), () when left out";

/// Recognises `%launch …` and `%debug on|off` on a cell's first line (the rest of the cell must be empty);
/// other cells are Rust (or evcxr's `:` commands) and come back as `None`.
pub fn magic(cell: &str) -> Option<Magic> {
    let trimmed = cell.trim();
    let first = trimmed.lines().next()?;
    let rest_empty = trimmed.lines().skip(1).all(|l| l.trim().is_empty());
    let (name, args) = first.split_once(char::is_whitespace).unwrap_or((first, ""));
    let args = args.trim();
    match name {
        "%launch" if rest_empty => Some(launch_magic(args)),
        "%debug" if rest_empty => Some(debug_magic(args)),
        "%launch" | "%debug" => Some(Magic::Usage(format!(
            "{name} takes one line; put the Rust code in a cell of its own"
        ))),
        _ if name.starts_with('%') => Some(Magic::Usage(format!(
            "unknown magic {name}: hasten's magics are %launch and %debug"
        ))),
        _ => None,
    }
}

fn debug_magic(args: &str) -> Magic {
    let on = match args.to_ascii_lowercase().as_str() {
        "on" | "1" | "true" | "yes" => true,
        "off" | "0" | "false" | "no" => false,
        "" => {
            return Magic::Code(
                "println!(\"debug mode is {}\", if hasten::utils::debug_mode_from_env().unwrap_or(false) { \"on\" } else { \"off\" });"
                    .to_owned(),
            );
        }
        other => return Magic::Usage(format!("usage: %debug on|off (got {other:?})")),
    };
    let value = if on { "1" } else { "0" };
    // The runner's environment is what notebook_launcher reads for the workers' debug mode. Nothing else
    // in the runner reads the environment concurrently at this point.
    Magic::Code(format!(
        "unsafe {{ std::env::set_var(\"{var}\", \"{value}\") }}\n\
         println!(\"debug mode {state} for the next launches ({var}={value})\");",
        var = hasten_core::DEBUG_MODE_VAR,
        state = if on { "on" } else { "off" },
    ))
}

fn launch_magic(args: &str) -> Magic {
    let mut words = args.split_whitespace().peekable();
    let mut n = "2".to_owned();
    let mut builder = String::new();
    let mut function = None;
    while let Some(word) = words.next() {
        match word {
            "-n" | "--num_processes" | "--num-processes" => match words.next() {
                Some(v) if v.parse::<usize>().is_ok_and(|v| v > 0) => n = v.to_owned(),
                _ => return Magic::Usage(LAUNCH_USAGE.to_owned()),
            },
            "--cpu" => builder.push_str(".cpu(true)"),
            "--debug" => builder.push_str(".debug(true)"),
            "--mixed_precision" | "--mixed-precision" => match words.next() {
                Some(mode @ ("no" | "fp16" | "bf16" | "fp8")) => builder.push_str(&format!(
                    ".mixed_precision(\"{mode}\".parse::<hasten::PrecisionType>().unwrap())"
                )),
                _ => return Magic::Usage(LAUNCH_USAGE.to_owned()),
            },
            w if w.starts_with('-') => return Magic::Usage(LAUNCH_USAGE.to_owned()),
            w => {
                function = Some(w.to_owned());
                break;
            }
        }
    }
    let Some(function) = function else {
        return Magic::Usage(LAUNCH_USAGE.to_owned());
    };
    let rest: Vec<&str> = words.collect();
    let call_args = if rest.is_empty() {
        "()".to_owned()
    } else {
        rest.join(" ")
    };
    Magic::Code(format!(
        "hasten_launch::NotebookLauncher::new({n}){builder}.launch({function}, {call_args})?"
    ))
}

/// Jupyter counts cursor positions in Unicode code points; evcxr wants byte offsets.
pub fn char_to_byte(text: &str, chars: usize) -> usize {
    text.char_indices()
        .nth(chars)
        .map_or(text.len(), |(b, _)| b)
}

/// The inverse of [`char_to_byte`].
pub fn byte_to_char(text: &str, byte: usize) -> usize {
    text.get(..byte.min(text.len()))
        .map_or(0, |s| s.chars().count())
}

/// Matches IPython's history search patterns: `*` any run of characters, `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completeness_follows_brackets_outside_literals_and_comments() {
        assert_eq!(completeness("let x = 1;"), Completeness::Complete);
        assert_eq!(
            completeness("fn f() {"),
            Completeness::Incomplete("    ".into())
        );
        assert_eq!(
            completeness("fn f() { vec![("),
            Completeness::Incomplete("            ".into())
        );
        assert_eq!(completeness("let s = \"{\";"), Completeness::Complete);
        assert_eq!(completeness("let s = r#\"}\"#;"), Completeness::Complete);
        assert_eq!(completeness("let c = '{'; // {"), Completeness::Complete);
        assert_eq!(
            completeness("fn f<'a>(x: &'a str) {}"),
            Completeness::Complete
        );
        assert_eq!(completeness("/* { */ 1"), Completeness::Complete);
        assert_eq!(
            completeness("let s = \"open"),
            Completeness::Incomplete(String::new())
        );
        // What rustc's lexer knows and a bracket counter would not.
        assert_eq!(
            completeness("let s = r##\"open\"#;"),
            Completeness::Incomplete(String::new())
        );
        assert_eq!(completeness("let b = b'{';"), Completeness::Complete);
        assert_eq!(completeness("/* /* { */ */ 1"), Completeness::Complete);
        assert_eq!(
            completeness("/* /* */ fn f() {"),
            Completeness::Incomplete(String::new())
        );
        assert_eq!(completeness("let s = c\"{\";"), Completeness::Complete);
        // evcxr commands are not Rust: TOML's single quotes must not read as an open char literal.
        assert_eq!(
            completeness(":dep regex = { version = '1.0' }\nlet x = 1;"),
            Completeness::Complete
        );
        // A char literal cannot continue on the next line.
        assert_eq!(completeness("let c = '{"), Completeness::Invalid);
        assert_eq!(completeness("let s = r#~\"x\"#;"), Completeness::Invalid);
        assert_eq!(completeness("}"), Completeness::Invalid);
        assert_eq!(completeness("(]"), Completeness::Invalid);
    }

    #[test]
    fn launch_magic_becomes_a_notebook_launcher_call() {
        assert_eq!(
            magic("%launch train (0.1, 3)"),
            Some(Magic::Code(
                "hasten_launch::NotebookLauncher::new(2).launch(train, (0.1, 3))?".into()
            ))
        );
        assert_eq!(
            magic("%launch -n 3 --cpu --debug f"),
            Some(Magic::Code(
                "hasten_launch::NotebookLauncher::new(3).cpu(true).debug(true).launch(f, ())?"
                    .into()
            ))
        );
        assert!(matches!(magic("%launch -n zero f"), Some(Magic::Usage(_))));
        assert!(matches!(magic("%launch"), Some(Magic::Usage(_))));
        assert!(matches!(
            magic("%launch f\nlet x = 1;"),
            Some(Magic::Usage(_))
        ));
        assert!(matches!(magic("%lunch f"), Some(Magic::Usage(_))));
        assert_eq!(magic("let x = 1 % 2;"), None);
        assert_eq!(magic(":dep serde = \"1\""), None);
    }

    #[test]
    fn debug_magic_sets_the_variable_the_launcher_reads() {
        let Some(Magic::Code(code)) = magic("%debug on") else {
            panic!()
        };
        assert!(
            code.contains("set_var(\"ACCELERATE_DEBUG_MODE\", \"1\")"),
            "{code}"
        );
        let Some(Magic::Code(code)) = magic("%debug off") else {
            panic!()
        };
        assert!(code.contains("\"0\""), "{code}");
        assert!(matches!(magic("%debug maybe"), Some(Magic::Usage(_))));
    }

    #[test]
    fn cursor_positions_convert_between_chars_and_bytes() {
        let s = "é = 1; x";
        assert_eq!(char_to_byte(s, 1), 2);
        assert_eq!(char_to_byte(s, 100), s.len());
        assert_eq!(byte_to_char(s, 2), 1);
        assert_eq!(byte_to_char(s, s.len()), s.chars().count());
    }

    #[test]
    fn history_patterns_are_globs() {
        assert!(glob_match("*1+1*", "let a = 1+1;"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("x*", "yx"));
    }
}
