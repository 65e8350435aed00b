//! Environment variables: boolean flags as Accelerate reads them, and temporary changes that are undone
//! even when the code in between panics.

use crate::{Error, Result};
use std::ffi::OsString;
use std::sync::Mutex;

/// Name of the variable that turns on debug mode (cross-rank shape checks before collectives).
pub const DEBUG_MODE_VAR: &str = "ACCELERATE_DEBUG_MODE";
/// Name of the variable that forces the CPU even where GPUs exist.
pub const USE_CPU_VAR: &str = "ACCELERATE_USE_CPU";
/// Name of the variable that carries the mixed-precision mode to workers.
pub const MIXED_PRECISION_VAR: &str = "ACCELERATE_MIXED_PRECISION";
/// Name of the variable that turns off binding each rank of a launcher to its own GPU (hasten's own; on
/// unless set to a false value).
pub const GPU_BINDING_VAR: &str = "HASTEN_GPU_BINDING";

/// Parses a boolean the way Accelerate's `str_to_bool` does: `y yes t true on 1` and
/// `n no f false off 0`, in any case. Returns `None` for anything else.
pub fn str_to_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" | "t" | "true" | "on" | "1" => Some(true),
        "n" | "no" | "f" | "false" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Reads a boolean flag from the environment: `default` when unset or empty, an error naming the
/// variable when set to something that is not a boolean.
pub fn parse_flag_from_env(var: &str, default: bool) -> Result<bool> {
    match std::env::var(var) {
        Err(_) => Ok(default),
        Ok(v) if v.trim().is_empty() => Ok(default),
        Ok(v) => str_to_bool(&v).ok_or_else(|| Error::EnvParse {
            var: var.to_owned(),
            value: v,
            expected: "a boolean (1/yes/true/on or 0/no/false/off)",
        }),
    }
}

/// Whether debug mode is on (`ACCELERATE_DEBUG_MODE`), default off.
pub fn debug_mode_from_env() -> Result<bool> {
    parse_flag_from_env(DEBUG_MODE_VAR, false)
}

/// Serialises hasten's own changes to the environment, so two threads patching at once cannot
/// interleave their saves and restores. The body of a patch runs outside the lock (patches nest).
static ENV_LOCK: Mutex<()> = Mutex::new(());

fn set_var(key: &str, value: Option<&OsString>) {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: std requires that no other thread reads or writes the environment concurrently. hasten's
    // writers hold ENV_LOCK; callers of patch_environment/clear_environment accept (see their docs)
    // that they must not run while other threads read the environment through libc.
    unsafe {
        match value {
            Some(v) => std::env::set_var(key, v),
            None => std::env::remove_var(key),
        }
    }
}

/// A set of environment changes that are undone when this value is dropped, also during a panic.
#[must_use = "the changes are undone as soon as the patch is dropped"]
#[derive(Debug)]
pub struct EnvPatch {
    saved: Vec<(String, Option<OsString>)>,
}

impl EnvPatch {
    /// Sets each `key` (upper-cased, as Accelerate does) to `value.to_string()` until the patch is dropped.
    pub fn apply<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: AsRef<str>,
        V: ToString,
    {
        let mut saved = Vec::new();
        for (key, value) in vars {
            let key = key.as_ref().to_uppercase();
            if !saved.iter().any(|(k, _)| *k == key) {
                saved.push((key.clone(), std::env::var_os(&key)));
            }
            set_var(&key, Some(&OsString::from(value.to_string())));
        }
        EnvPatch { saved }
    }
}

impl Drop for EnvPatch {
    fn drop(&mut self) {
        // Restore in reverse so a key listed twice ends at its original value.
        for (key, old) in self.saved.iter().rev() {
            set_var(key, old.as_ref());
        }
    }
}

/// Runs `body` with the given variables set (keys upper-cased, values stringified), then restores or
/// removes each one, even if `body` panics. Accelerate's `patch_environment`.
///
/// The environment is process-wide: do not call this while other threads read the environment.
pub fn patch_environment<K, V, R>(
    vars: impl IntoIterator<Item = (K, V)>,
    body: impl FnOnce() -> R,
) -> R
where
    K: AsRef<str>,
    V: ToString,
{
    let _patch = EnvPatch::apply(vars);
    body()
}

/// Runs `body` with an empty environment, then restores the environment exactly as it was (variables
/// the body set are removed), even if `body` panics. Accelerate's `clear_environment`.
///
/// The environment is process-wide: do not call this while other threads read the environment.
pub fn clear_environment<R>(body: impl FnOnce() -> R) -> R {
    struct Restore(Vec<(OsString, OsString)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            for (key, _) in std::env::vars_os() {
                if let Some(key) = key.to_str() {
                    set_var(key, None);
                }
            }
            for (key, value) in &self.0 {
                if let Some(key) = key.to_str() {
                    set_var(key, Some(value));
                }
            }
        }
    }
    let saved: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let _restore = Restore(saved.clone());
    for (key, _) in &saved {
        if let Some(key) = key.to_str() {
            set_var(key, None);
        }
    }
    body()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_in_any_case() {
        for yes in ["1", "yes", "YES", "True", "true", "TRUE", "y", "on", "t"] {
            assert_eq!(str_to_bool(yes), Some(true), "{yes}");
        }
        for no in ["0", "no", "No", "FALSE", "false", "n", "off", "f"] {
            assert_eq!(str_to_bool(no), Some(false), "{no}");
        }
        for junk in ["", "2", "yess", "enabled"] {
            assert_eq!(str_to_bool(junk), None, "{junk}");
        }
    }

    #[test]
    fn debug_mode_flag() {
        let var = "HASTEN_TEST_DEBUG_FLAG_A";
        assert!(!parse_flag_from_env(var, false).unwrap());
        for (value, expected) in [
            ("1", true),
            ("Yes", true),
            ("TRUE", true),
            ("no", false),
            ("0", false),
        ] {
            patch_environment([(var, value)], || {
                assert_eq!(
                    parse_flag_from_env(var, false).unwrap(),
                    expected,
                    "{value}"
                );
            });
        }
        patch_environment([(var, "maybe")], || {
            let err = parse_flag_from_env(var, false).unwrap_err().to_string();
            assert!(err.contains("HASTEN_TEST_DEBUG_FLAG_A=\"maybe\""), "{err}");
        });
        patch_environment([(DEBUG_MODE_VAR, "yes")], || {
            assert!(debug_mode_from_env().unwrap())
        });
        patch_environment([(DEBUG_MODE_VAR, "False")], || {
            assert!(!debug_mode_from_env().unwrap())
        });
    }

    #[test]
    fn patch_sets_upper_cased_keys_and_restores() {
        // SAFETY: a key unique to this test; no other thread reads it.
        unsafe { std::env::set_var("HASTEN_TEST_PATCH_KEEP", "old") };
        patch_environment(
            [
                ("hasten_test_patch_keep", "new".to_string()),
                ("hasten_test_patch_new", 7.to_string()),
            ],
            || {
                assert_eq!(std::env::var("HASTEN_TEST_PATCH_KEEP").unwrap(), "new");
                assert_eq!(std::env::var("HASTEN_TEST_PATCH_NEW").unwrap(), "7");
            },
        );
        assert_eq!(std::env::var("HASTEN_TEST_PATCH_KEEP").unwrap(), "old");
        assert!(std::env::var_os("HASTEN_TEST_PATCH_NEW").is_none());
    }

    #[test]
    fn patch_restores_after_a_panic() {
        let result = std::panic::catch_unwind(|| {
            patch_environment([("HASTEN_TEST_PATCH_PANIC", 1)], || {
                assert_eq!(std::env::var("HASTEN_TEST_PATCH_PANIC").unwrap(), "1");
                panic!("boom");
            })
        });
        assert!(result.is_err());
        assert!(std::env::var_os("HASTEN_TEST_PATCH_PANIC").is_none());
    }

    #[test]
    fn nested_patches_unwind_in_order() {
        patch_environment([("HASTEN_TEST_NEST", "outer")], || {
            patch_environment([("HASTEN_TEST_NEST", "inner")], || {
                assert_eq!(std::env::var("HASTEN_TEST_NEST").unwrap(), "inner");
            });
            assert_eq!(std::env::var("HASTEN_TEST_NEST").unwrap(), "outer");
        });
        assert!(std::env::var_os("HASTEN_TEST_NEST").is_none());
    }

    #[test]
    fn clear_environment_empties_then_restores_even_on_panic() {
        let before: Vec<_> = std::env::vars_os().collect();
        assert!(!before.is_empty());
        let result = std::panic::catch_unwind(|| {
            clear_environment(|| {
                assert_eq!(std::env::vars_os().count(), 0);
                // SAFETY: the environment is ours alone inside this test process (nextest).
                unsafe { std::env::set_var("HASTEN_TEST_CLEARED_NEW", "x") };
                panic!("boom");
            })
        });
        assert!(result.is_err());
        let mut after: Vec<_> = std::env::vars_os().collect();
        let mut before = before;
        before.sort();
        after.sort();
        assert_eq!(before, after);
    }
}
