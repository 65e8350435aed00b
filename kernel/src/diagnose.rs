//! Errors from evcxr as text a person can act on: never empty, and, when bringing hasten into scope
//! fails, what failed (cargo's own output) and what to do about it.

use crate::session::SessionPaths;
use std::path::Path;
use std::process::Command;

/// evcxr's error as text. Compilation errors are rustc's rendering (or their message where cargo gave no
/// rendering); an error with no text at all still says so, with evcxr's own description of it.
pub fn describe(e: &evcxr::Error) -> String {
    let text = match e {
        evcxr::Error::CompilationErrors(errors) => errors
            .iter()
            .map(|e| {
                let rendered = e.rendered();
                if rendered.trim().is_empty() {
                    e.message()
                } else {
                    rendered
                }
            })
            .filter(|t| !t.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    };
    if text.trim().is_empty() {
        format!("evcxr reported a failure without any text ({e:?})")
    } else {
        text
    }
}

/// Why the notebook prelude (`:dep hasten`, `:dep hasten_launch`, `:dep hasten_kernel_io`) failed, and
/// what to do.
///
/// evcxr resolves the notebook crate offline against hasten's Cargo.lock: every package that lock names
/// must be in cargo's registry, also those only other platforms build. The usual cause of a failure is
/// one missing, so the same check runs here on its own and its output comes with the message.
pub fn prelude_failure(paths: &SessionPaths, e: &evcxr::Error) -> String {
    let mut message = format!(
        "bringing hasten into scope failed (`:dep hasten`, `:dep hasten_launch` and `:dep hasten_kernel_io` \
         from {}):\n{}",
        paths.source.display(),
        describe(e)
    );
    match offline_resolution(&paths.source) {
        Err(cargo_output) => {
            let registry = std::env::var("CARGO_HOME").unwrap_or_else(|_| "~/.cargo".into());
            message.push_str(&format!(
                "\n\n`cargo metadata --locked --offline` over {} fails:\n{}\n\
                 Notebooks build offline against hasten's Cargo.lock, so every package it names must \
                 already be in cargo's registry ({registry}). To fix: run `cargo fetch --locked` in {} \
                 (install/bootstrap.sh does it), then restart the kernel.",
                paths.source.join("Cargo.toml").display(),
                cargo_output.trim_end(),
                paths.source.display()
            ));
        }
        Ok(()) => message.push_str(&format!(
            "\n\nEvery package of Cargo.lock is in cargo's registry, so the build itself failed. \
             `hasten-kernel warm` in a terminal shows cargo's whole output; libtorch for the build: {}.",
            paths
                .libtorch
                .as_deref()
                .map_or_else(|| "not set (LIBTORCH)".into(), |p| p.display().to_string())
        )),
    }
    message
}

/// `cargo metadata --locked --offline` over hasten's workspace: Err with cargo's output when a package
/// of the lock file is missing from the registry (or cargo cannot run).
fn offline_resolution(source: &Path) -> Result<(), String> {
    let out = Command::new("cargo")
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .arg("--manifest-path")
        .arg(source.join("Cargo.toml"))
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_without_text_still_says_something() {
        let empty = describe(&evcxr::Error::Message(String::new()));
        assert!(empty.contains("without any text"), "{empty}");
        let empty = describe(&evcxr::Error::CompilationErrors(Vec::new()));
        assert!(empty.contains("CompilationErrors"), "{empty}");
        assert_eq!(describe(&evcxr::Error::Message("boom".into())), "boom");
    }
}
