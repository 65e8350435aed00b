//! hasten's warnings and traces are `tracing` events with targets under `hasten` (`hasten::checkpoint`,
//! `hasten::ddp`, …), so a program with its own subscriber filters and formats them like its own. A
//! program without one still sees them: each event then goes to hasten's fallback, plain lines on
//! stderr (the message alone) filtered by `HASTEN_LOG` (tracing's target syntax, default
//! `hasten=info`); `HASTEN_TRACE_DDP=1` and `HASTEN_TRACE_INIT=1` add `hasten::ddp=debug` and
//! `hasten::init=debug`. The fallback is used per event and never installed as the global default, so
//! the program can still set its own.

use std::sync::OnceLock;
use tracing::Dispatch;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;

/// The fallback dispatcher, built once.
fn fallback() -> &'static Dispatch {
    static FALLBACK: OnceLock<Dispatch> = OnceLock::new();
    FALLBACK.get_or_init(|| {
        let mut spec = std::env::var("HASTEN_LOG").unwrap_or_else(|_| "hasten=info".into());
        for (var, target) in [
            ("HASTEN_TRACE_DDP", "hasten::ddp"),
            ("HASTEN_TRACE_INIT", "hasten::init"),
        ] {
            if crate::parse_flag_from_env(var, false).unwrap_or(false) {
                spec.push_str(&format!(",{target}=debug"));
            }
        }
        // A spec that does not parse keeps the default rather than silencing hasten.
        let targets: Targets = spec
            .parse()
            .unwrap_or_else(|_| "hasten=info".parse().expect("a valid default"));
        let plain = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .without_time()
            .with_level(false)
            .with_target(false);
        Dispatch::new(tracing_subscriber::registry().with(plain).with(targets))
    })
}

/// Runs `emit` (which emits events) against the program's global subscriber, or hasten's fallback
/// where the program has none.
pub(crate) fn with_subscriber(emit: impl FnOnce()) {
    // The dispatcher in force here (the program's global or scoped one, if any). Not
    // `dispatcher::has_been_set`: it turns true for good once any scoped dispatcher was set, the
    // fallback's own included.
    let none = tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>());
    if none {
        tracing::dispatcher::with_default(fallback(), emit);
    } else {
        emit();
    }
}

/// A `tracing` event that reaches a subscriber even in a program without one (see the module docs):
/// `log::event!(warn, target: "hasten::checkpoint", "hasten: warning: …")`.
macro_rules! event {
    ($level:ident, target: $target:expr, $($arg:tt)+) => {
        $crate::log::with_subscriber(|| ::tracing::$level!(target: $target, $($arg)+))
    };
}
pub(crate) use event;

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer, for a subscriber of the test's own.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_go_to_the_programs_subscriber_when_it_has_one() {
        // No subscriber: the fallback takes it (stderr), and afterwards there is still none in force.
        event!(warn, target: "hasten::test", "hasten: warning: to the fallback");
        let none =
            tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>());
        assert!(none, "the fallback stayed in force");
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let own = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(own, || {
            event!(warn, target: "hasten::test", "hasten: warning: to the program's");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("to the program's"), "{text:?}");
        assert!(text.contains("hasten::test"), "{text:?}");
        assert!(!text.contains("to the fallback"), "{text:?}");
    }
}
