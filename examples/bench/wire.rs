//! A counting TCP proxy between a connection pool and PostgreSQL: what the engine costs on
//! the wire (bytes, round trips, time waiting on the server and, on plaintext connections,
//! the protocol messages). pg_stat_statements would say more, but a server (or a fresh CI
//! machine) rarely preloads it; the wire is always there.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The SSLRequest's code: the server answers it with one byte, 'S' (TLS follows) or 'N'.
const SSL_REQUEST: u32 = 80_877_103;

/// What went over the wire, summed over every connection through one proxy.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WireCounts {
    pub(crate) connections: u64,
    pub(crate) tls_connections: u64,
    pub(crate) to_server: u64,
    pub(crate) to_client: u64,
    /// Turns the server answered: the client spoke after the server, then the server did.
    pub(crate) round_trips: u64,
    /// Per turn, the client's first byte to the server's first answering byte, summed.
    pub(crate) waiting_ns: u64,
    /// Wall time in which at least one turn awaited its answer (overlaps counted once).
    pub(crate) busy_ns: u64,
    // Frontend messages, plaintext connections only.
    pub(crate) queries: u64,
    pub(crate) executes: u64,
    pub(crate) parses: u64,
    pub(crate) syncs: u64,
    /// Turns of a lone Sync: sqlx's ping when a pooled connection is checked in or out.
    pub(crate) pings: u64,
}

impl WireCounts {
    /// What happened since `before` (a snapshot of the same proxy).
    pub(crate) fn since(&self, before: &WireCounts) -> WireCounts {
        WireCounts {
            connections: self.connections - before.connections,
            tls_connections: self.tls_connections - before.tls_connections,
            to_server: self.to_server - before.to_server,
            to_client: self.to_client - before.to_client,
            round_trips: self.round_trips - before.round_trips,
            waiting_ns: self.waiting_ns - before.waiting_ns,
            busy_ns: self.busy_ns - before.busy_ns,
            queries: self.queries - before.queries,
            executes: self.executes - before.executes,
            parses: self.parses - before.parses,
            syncs: self.syncs - before.syncs,
            pings: self.pings - before.pings,
        }
    }

    /// Simple queries plus extended-protocol executions.
    pub(crate) fn statements(&self) -> u64 {
        self.queries + self.executes
    }
}

/// The counts, and the turns in flight over all connections (for `busy_ns`).
#[derive(Default)]
struct Shared {
    counts: WireCounts,
    outstanding: u32,
    busy_since: Option<Instant>,
}

impl Shared {
    fn begin_turn(&mut self, now: Instant) {
        if self.outstanding == 0 {
            self.busy_since = Some(now);
        }
        self.outstanding += 1;
    }

    fn end_turn(&mut self, now: Instant) {
        self.outstanding = self.outstanding.saturating_sub(1);
        if self.outstanding == 0
            && let Some(since) = self.busy_since.take()
        {
            self.counts.busy_ns += nanos(now - since);
        }
    }
}

/// Where a connection's frontend stream is.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    /// Next comes an untyped message: StartupMessage or SSLRequest.
    Untyped,
    /// SSLRequest sent; the server's one-byte answer decides.
    SslAsked,
    /// Typed messages: 1 type byte, then an int32 length that includes itself.
    Typed,
    /// Encrypted: only bytes and turns are counted.
    Tls,
}

/// One connection's parser and open turn.
struct Conn {
    phase: Phase,
    /// The current message's header bytes read so far (8 untyped, 5 typed).
    head: Vec<u8>,
    /// Body bytes of the current message still to pass.
    skip: usize,
    /// When the open turn's first client byte arrived.
    asked: Option<Instant>,
    turn_syncs: bool,
    turn_other: bool,
}

impl Conn {
    fn client_sent(&mut self, data: &[u8], now: Instant, shared: &mut Shared) {
        shared.counts.to_server += data.len() as u64;
        if self.asked.is_none() {
            self.asked = Some(now);
            (self.turn_syncs, self.turn_other) = (false, false);
            shared.begin_turn(now);
        }
        self.parse(data, &mut shared.counts);
    }

    fn server_sent(&mut self, data: &[u8], now: Instant, shared: &mut Shared) {
        shared.counts.to_client += data.len() as u64;
        if self.phase == Phase::SslAsked {
            self.phase = if data.first() == Some(&b'S') {
                shared.counts.tls_connections += 1;
                Phase::Tls
            } else {
                Phase::Untyped
            };
        }
        if let Some(asked) = self.asked.take() {
            shared.counts.round_trips += 1;
            shared.counts.waiting_ns += nanos(now - asked);
            if self.turn_syncs && !self.turn_other {
                shared.counts.pings += 1;
            }
            shared.end_turn(now);
        }
    }

    /// Counts the frontend messages in `data`, which may end or begin mid-message.
    fn parse(&mut self, mut data: &[u8], counts: &mut WireCounts) {
        while !data.is_empty() && matches!(self.phase, Phase::Untyped | Phase::Typed) {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                (self.skip, data) = (self.skip - n, &data[n..]);
                continue;
            }
            let want = if self.phase == Phase::Untyped { 8 } else { 5 };
            let n = (want - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.head.len() < want {
                break;
            }
            let int = |h: &[u8]| u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if self.phase == Phase::Untyped {
                let (len, code) = (int(&self.head[0..]), int(&self.head[4..]));
                self.skip = len.saturating_sub(8);
                self.phase = if len == 8 && code == SSL_REQUEST as usize {
                    Phase::SslAsked
                } else {
                    Phase::Typed
                };
            } else {
                self.skip = int(&self.head[1..]).saturating_sub(4);
                match self.head[0] {
                    b'S' => {
                        counts.syncs += 1;
                        self.turn_syncs = true;
                    }
                    tag => {
                        self.turn_other = true;
                        match tag {
                            b'Q' => counts.queries += 1,
                            b'E' => counts.executes += 1,
                            b'P' => counts.parses += 1,
                            _ => {}
                        }
                    }
                }
            }
            self.head.clear();
        }
    }
}

/// The proxy: listens on 127.0.0.1 and forwards every connection to one server.
pub(crate) struct Wire {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    accept: JoinHandle<()>,
}

impl Wire {
    pub(crate) async fn start(target_host: &str, target_port: u16) -> anyhow::Result<Wire> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let target = format!("{target_host}:{target_port}");
        let counts = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, target.clone(), counts.clone()));
            }
        });
        Ok(Wire {
            addr,
            shared,
            accept,
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn snapshot(&self) -> WireCounts {
        lock(&self.shared).counts
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies both directions of one connection until either side closes.
async fn forward(client: TcpStream, target: String, shared: Arc<Mutex<Shared>>) {
    let Ok(server) = TcpStream::connect(&target).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    lock(&shared).counts.connections += 1;
    let conn = Arc::new(Mutex::new(Conn {
        phase: Phase::Untyped,
        head: Vec::with_capacity(8),
        skip: 0,
        asked: None,
        turn_syncs: false,
        turn_other: false,
    }));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let _ = tokio::try_join!(
        pump(client_read, server_write, &conn, &shared, true),
        pump(server_read, client_write, &conn, &shared, false),
    );
    // A turn left unanswered (Terminate, or a dropped connection) no longer waits.
    if lock(&conn).asked.take().is_some() {
        lock(&shared).end_turn(Instant::now());
    }
}

/// One direction: counts each read before passing it on, so the other direction's
/// answer always finds the turn (and the SSLRequest) already recorded.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    conn: &Mutex<Conn>,
    shared: &Mutex<Shared>,
    from_client: bool,
) -> std::io::Result<()> {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        {
            let now = Instant::now();
            let (mut conn, mut shared) = (lock(conn), lock(shared));
            if from_client {
                conn.client_sent(&buf[..n], now, &mut shared);
            } else {
                conn.server_sent(&buf[..n], now, &mut shared);
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
