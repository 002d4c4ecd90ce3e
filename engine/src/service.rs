//! What a long-running reel binary shares (feature `service`): logging to stderr and
//! graceful shutdown on signals.

use tokio_util::sync::CancellationToken;

/// Installs the global tracing subscriber: stderr, filtered by `REEL_LOG` (default
/// `info`), text (coloured only on a terminal) or JSON lines.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// First SIGTERM/SIGINT: cancels `shutdown` (the service finishes what is in flight).
/// Second: exits at once with status 130. `draining` is logged with the first signal.
pub async fn cancel_on_signals(shutdown: CancellationToken, draining: &'static str) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    for count in 1.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if count == 1 {
            tracing::info!("shutting down: {draining} (signal again to exit at once)");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}
