//! What a long-running reel binary shares (feature `service`): logging to stderr, traces
//! over OTLP (feature `otlp`), and graceful shutdown on signals.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// What [`init_logging`] started that must be flushed before the process exits: the span
/// exporter, when one runs. Dropping it flushes too; [`Telemetry::shutdown`] says so.
#[must_use = "dropping it at once shuts the span exporter down"]
#[derive(Debug, Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (the `OTEL_EXPORTER_OTLP_*` variables said where).
    pub fn exporting(&self) -> bool {
        #[cfg(feature = "otlp")]
        {
            self.provider.is_some()
        }
        #[cfg(not(feature = "otlp"))]
        {
            false
        }
    }

    /// Exports the spans still buffered (within `OTEL_EXPORTER_OTLP_TIMEOUT`) and stops
    /// the exporter.
    pub fn shutdown(mut self) {
        self.flush_and_stop();
    }

    fn flush_and_stop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("warning: cannot flush the last spans to the OTLP endpoint: {err}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.flush_and_stop();
    }
}

/// Installs the global tracing subscriber: log lines on stderr, filtered by `REEL_LOG`
/// (default `info`), text (coloured only on a terminal) or JSON lines. Log lines carry
/// no span context (they name their task themselves): spans are for traces.
///
/// With feature `otlp`, and when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans (filtered by `REEL_TRACE`, default
/// `info`) are also exported over OTLP/HTTP with protobuf, configured by the standard
/// variables (`OTEL_SERVICE_NAME`, default the program's name; `OTEL_RESOURCE_ATTRIBUTES`;
/// `OTEL_EXPORTER_OTLP_HEADERS`; `OTEL_BSP_*`). `OTEL_SDK_DISABLED=true` or
/// `OTEL_TRACES_EXPORTER=none` turn the export off. Nothing is exported otherwise.
pub fn init_logging(json: bool) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let only_events = tracing_subscriber::filter::filter_fn(|meta| meta.is_event());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = if json {
        fmt.json()
            .with_filter(filter)
            .with_filter(only_events)
            .boxed()
    } else {
        fmt.with_filter(filter).with_filter(only_events).boxed()
    };
    let registry = tracing_subscriber::registry().with(fmt);
    #[cfg(feature = "otlp")]
    {
        let (layer, telemetry) = otlp::layer();
        registry.with(layer).init();
        telemetry
    }
    #[cfg(not(feature = "otlp"))]
    {
        registry.init();
        Telemetry::default()
    }
}

/// A layer exporting spans over OTLP/HTTP to `traces_url` (say
/// `http://127.0.0.1:4318/v1/traces`), for programs that set up their own subscriber (the
/// bench); the `OTEL_*` variables configure the rest. Keep the [`Telemetry`] until exit.
#[cfg(feature = "otlp")]
pub fn otlp_layer<S>(traces_url: &str) -> (Box<dyn Layer<S> + Send + Sync>, Telemetry)
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    match otlp::exporting_to(Some(traces_url)) {
        (Some(layer), telemetry) => (layer, telemetry),
        (None, telemetry) => (
            tracing_subscriber::layer::Identity::new().boxed(),
            telemetry,
        ),
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::Layer;
    use tracing_subscriber::registry::LookupSpan;

    use super::Telemetry;

    fn set(name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }

    /// Whether the standard variables ask for an export of traces.
    fn configured() -> bool {
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
            || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"))
        {
            return false;
        }
        set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
    }

    /// The service name when the variables give none: the program's file name.
    fn default_service_name() -> Option<String> {
        let named = set("OTEL_SERVICE_NAME").is_some()
            || set("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
                attrs
                    .split(',')
                    .any(|kv| kv.trim().starts_with("service.name="))
            });
        if named {
            return None;
        }
        let exe = std::env::current_exe().ok()?;
        Some(exe.file_stem()?.to_string_lossy().into_owned())
    }

    /// The OpenTelemetry layer, when the variables ask for an export (else none), and
    /// what to flush at exit.
    pub(super) fn layer<S>() -> (Option<Box<dyn Layer<S> + Send + Sync>>, Telemetry)
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        if !configured() {
            return (None, Telemetry::default());
        }
        exporting_to(None)
    }

    /// The layer exporting to `endpoint` (the traces URL itself), or where the variables
    /// say; the rest of the configuration from the variables.
    pub(super) fn exporting_to<S>(
        endpoint: Option<&str>,
    ) -> (Option<Box<dyn Layer<S> + Send + Sync>>, Telemetry)
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary);
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let exporter = match builder.build() {
            Ok(exporter) => exporter,
            Err(err) => {
                eprintln!(
                    "warning: traces are not exported: cannot set up the OTLP exporter: {err}"
                );
                return (None, Telemetry::default());
            }
        };
        let mut resource = Resource::builder();
        if let Some(name) = default_service_name() {
            resource = resource.with_service_name(name);
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let filter = tracing_subscriber::EnvFilter::try_from_env("REEL_TRACE")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Spans carry what their fields say, no more: source locations, threads, targets
        // and busy/idle timings would double each span's attributes, and activating an
        // OpenTelemetry context on every poll of an instrumented future costs each item
        // (reel parents its spans through `tracing`, and sets remote parents itself).
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("reel"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(filter)
            .boxed();
        (
            Some(layer),
            Telemetry {
                provider: Some(provider),
            },
        )
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
