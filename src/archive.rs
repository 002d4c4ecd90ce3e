//! Archives of finished tasks' streams (issue 31): a local directory or an S3-compatible
//! bucket, through `object_store`.
//!
//! One object per task and history, `PREFIX/CHANNEL/TASK/VERSION-DIGEST.jsonl.gz`: gzip of
//! a manifest line then one line per event, each event every column of its `events` row
//! exactly as stored ([`StoredEvent`]). The manifest counts the events and holds the
//! SHA-256 of the event lines, so a reader knows an object is whole before it trusts it.
//! An object's bytes follow from the history alone, and its name from its version and
//! digest: two archivers of the same history write the same bytes to the same name, and
//! one holding an older history (a task retried since) writes beside it, never over it.
//!
//! The order is crash-safe: write the object, read it back and compare it with the rows,
//! then delete the rows in a transaction that re-checks the task
//! ([`PgStore::finish_archive`]). A crash anywhere leaves the stream in PostgreSQL (and
//! maybe an object nobody references yet, overwritten by the next run) or archived and
//! verified: never missing, never half.

use std::io::{Read, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use engine::audit::audit;
use engine::{
    ArchiveCandidate, ArchiveCommit, PgStore, RecordedEvent, RestoreOutcome, StoredEvent, TaskId,
};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The archive format's version, in every manifest.
pub const FORMAT: u32 = 1;

/// What went wrong with an archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The `--to` value is neither a path, a `file://` URL nor an `s3://bucket/prefix`.
    #[error("{0}")]
    Target(String),
    /// The object store refused or failed (missing credentials, no such bucket, network).
    #[error("archive storage: {0}")]
    Storage(#[from] object_store::Error),
    /// An object that is not a whole, matching archive of its task.
    #[error("archive {location} is not usable: {reason}")]
    Corrupt { location: String, reason: String },
    #[error(transparent)]
    Engine(#[from] engine::Error),
}

type Result<T> = std::result::Result<T, ArchiveError>;

/// The first line of an archive object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The format's version ([`FORMAT`]).
    pub reel_archive: u32,
    pub task: TaskId,
    pub channel: String,
    pub workflow: String,
    pub status: String,
    /// How many event lines follow: the stream's versions 1 to `events`.
    pub events: u32,
    /// SHA-256 (lowercase hex) of the event lines as written, newlines included.
    pub sha256: String,
    /// Uncompressed size of the event lines.
    pub bytes: u64,
}

/// An archive object read and verified.
#[derive(Debug)]
pub struct ArchivedStream {
    pub manifest: Manifest,
    pub events: Vec<StoredEvent>,
}

impl ArchivedStream {
    /// The events decoded as a read from the log decodes them.
    pub fn recorded(&self) -> engine::Result<Vec<RecordedEvent>> {
        self.events.iter().map(StoredEvent::decode).collect()
    }
}

/// Where archives are written: a store and a prefix in it.
#[derive(Clone, Debug)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The URL of the prefix (`file:///abs/dir`, `s3://bucket/prefix`): locations are it
    /// plus the object's path.
    base: String,
}

/// What archiving one task did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Archived {
    /// Written, verified and deleted from PostgreSQL.
    Done {
        events: u64,
        /// The object's size, compressed.
        bytes: u64,
    },
    /// The task changed since it was picked (a retry, another archiver): left as it is.
    Changed,
    /// A follower of the log has not read all of it yet: left in PostgreSQL.
    FollowerBehind { follower: String },
    /// Another archiver archived it first.
    AlreadyArchived,
}

impl Archive {
    /// The archive at `target`: a directory (a path, or `file:///abs/dir`; created if
    /// missing) or `s3://bucket/prefix`, whose credentials, region and endpoint come from
    /// the standard `AWS_*` environment variables.
    pub fn open(target: &str) -> Result<Archive> {
        Archive::open_with(target, &[])
    }

    /// [`Archive::open`] with S3 settings given as `AWS_*` variable names and values,
    /// which win over the environment's (a program that keeps its credentials elsewhere).
    pub fn open_with(target: &str, settings: &[(String, String)]) -> Result<Archive> {
        let target = target.trim();
        if target.is_empty() {
            return Err(ArchiveError::Target(
                "an archive target is a directory, a file:// URL or s3://bucket/prefix".into(),
            ));
        }
        if let Some(rest) = target.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(ArchiveError::Target(format!("{target}: no bucket")));
            }
            let mut builder = object_store::aws::AmazonS3Builder::from_env();
            for (key, value) in settings {
                let key = key
                    .to_ascii_lowercase()
                    .parse()
                    .map_err(|_| ArchiveError::Target(format!("{key} is not an S3 setting")))?;
                builder = builder.with_config(key, value);
            }
            let store = builder.with_bucket_name(bucket).build()?;
            let prefix = Path::from(prefix.trim_matches('/'));
            let base = format!("s3://{bucket}/{prefix}")
                .trim_end_matches('/')
                .to_owned();
            return Ok(Archive {
                store: Arc::new(store),
                prefix,
                base,
            });
        }
        if target.contains("://") && !target.starts_with("file://") {
            return Err(ArchiveError::Target(format!(
                "{target}: an archive is a directory, a file:// URL or s3://bucket/prefix"
            )));
        }
        let dir = match target.strip_prefix("file://") {
            Some(path) => PathBuf::from(path),
            None => PathBuf::from(target),
        };
        std::fs::create_dir_all(&dir).map_err(|e| {
            ArchiveError::Target(format!(
                "cannot create the archive directory {}: {e}",
                dir.display()
            ))
        })?;
        let dir = dir.canonicalize().map_err(|e| {
            ArchiveError::Target(format!("archive directory {}: {e}", dir.display()))
        })?;
        Archive::directory(&dir)
    }

    fn directory(dir: &FsPath) -> Result<Archive> {
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
        Ok(Archive {
            store: Arc::new(store),
            prefix: Path::default(),
            base: format!("file://{}", dir.display()),
        })
    }

    /// The archive holding the object at `location` (as recorded on a task's row), and the
    /// object's path in it.
    fn at_location(location: &str, settings: &[(String, String)]) -> Result<(Archive, Path)> {
        let corrupt = |reason: &str| ArchiveError::Corrupt {
            location: location.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, key) = rest
                .split_once('/')
                .ok_or_else(|| corrupt("no object key"))?;
            let archive = Archive::open_with(&format!("s3://{bucket}"), settings)?;
            // The key as recorded is the store's own (already escaped) form.
            let key = Path::parse(key).map_err(|e| corrupt(&e.to_string()))?;
            return Ok((archive, key));
        }
        let path = location
            .strip_prefix("file://")
            .ok_or_else(|| corrupt("not a file:// or s3:// location"))?;
        let path = FsPath::new(path);
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(corrupt("not a file"));
        };
        let archive = Archive::directory(dir)?;
        let name =
            Path::parse(name.to_string_lossy().as_ref()).map_err(|e| corrupt(&e.to_string()))?;
        Ok((archive, name))
    }

    /// The URL this archive writes under.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn object_of(&self, channel: &str, task: TaskId, manifest: &Manifest) -> Path {
        let task = task.to_string();
        let digest = manifest.sha256.get(..16).unwrap_or(&manifest.sha256);
        let name = format!("{:08}-{digest}.jsonl.gz", manifest.events);
        let mut path = self.prefix.clone();
        for part in [channel, task.as_str(), name.as_str()] {
            path = path.join(part);
        }
        path
    }

    /// The URL of `object`: for a bucket, its key exactly as the store names it; for a
    /// directory, the file's path.
    fn location_of(&self, object: &Path) -> String {
        match self.base.strip_prefix("s3://") {
            Some(rest) => {
                let bucket = rest.split('/').next().unwrap_or(rest);
                format!("s3://{bucket}/{object}")
            }
            None => format!("{}/{object}", self.base),
        }
    }

    /// Archives one finished task: writes its stream, reads it back and compares it with
    /// the rows, then deletes the rows if the task is still as picked.
    pub async fn archive_task(&self, store: &PgStore, task: &ArchiveCandidate) -> Result<Archived> {
        let events = store.stored_stream(task.task).await?;
        let whole = events.len() as u64 == u64::from(task.version)
            && events.iter().zip(1..).all(|(e, v)| e.stream_version == v);
        if !whole {
            // Archived by someone else, or appended to, since it was picked.
            return Ok(match store.archive_location(task.task).await? {
                Some(_) => Archived::AlreadyArchived,
                None => Archived::Changed,
            });
        }
        let manifest = Manifest {
            reel_archive: FORMAT,
            task: task.task,
            channel: task.channel.as_str().to_owned(),
            workflow: task.workflow.clone(),
            status: task.status.as_str().to_owned(),
            events: task.version,
            sha256: String::new(),
            bytes: 0,
        };
        let (object, written) = encode(manifest, &events)?;
        let path = self.object_of(task.channel.as_str(), task.task, &written);
        let location = self.location_of(&path);
        let size = object.len() as u64;
        self.store.put(&path, object.into()).await?;
        // Read back what the store holds, not what was sent.
        let stored = self.store.get(&path).await?.bytes().await?;
        let read = decode(&location, &stored)?;
        let same = read.manifest == written
            && read.events.len() == events.len()
            && read.events.iter().zip(&events).all(|(a, b)| a.same_as(b));
        if !same {
            return Err(ArchiveError::Corrupt {
                location,
                reason: "what was read back differs from what was written".into(),
            });
        }
        let summary = summary(&events);
        Ok(
            match store
                .finish_archive(task.task, task.version, &location, &summary)
                .await?
            {
                ArchiveCommit::Archived { events } => Archived::Done {
                    events,
                    bytes: size,
                },
                ArchiveCommit::Changed => Archived::Changed,
                ArchiveCommit::FollowerBehind { follower } => Archived::FollowerBehind { follower },
                ArchiveCommit::AlreadyArchived => Archived::AlreadyArchived,
            },
        )
    }

    /// Reads and verifies the archive object at `location`.
    pub async fn read(location: &str) -> Result<ArchivedStream> {
        Archive::read_with(location, &[]).await
    }

    /// [`Archive::read`] with S3 settings (see [`Archive::open_with`]).
    pub async fn read_with(
        location: &str,
        settings: &[(String, String)],
    ) -> Result<ArchivedStream> {
        let (archive, path) = Archive::at_location(location, settings)?;
        let bytes = archive.store.get(&path).await?.bytes().await?;
        decode(location, &bytes)
    }
}

/// Puts `task`'s archived stream back into PostgreSQL (nothing to do if it is not
/// archived).
pub async fn restore(store: &PgStore, task: TaskId) -> Result<RestoreOutcome> {
    let Some(location) = store.archive_location(task).await? else {
        return Ok(RestoreOutcome::NotArchived);
    };
    let archived = Archive::read(&location).await?;
    if archived.manifest.task != task {
        return Err(ArchiveError::Corrupt {
            location,
            reason: format!("it holds task {}", archived.manifest.task),
        });
    }
    Ok(store.restore_stream(task, &archived.events).await?)
}

/// `reel retry`: [`engine::commands::retry_as`], restoring an archived failed task from
/// its archive first (it then resumes by replay as always). A task that could not be
/// retried anyway stays archived.
pub async fn retry(
    store: &PgStore,
    task: TaskId,
    actor: Option<&str>,
) -> Result<engine::TaskState> {
    match engine::commands::retry_as(store, task, actor).await {
        Err(engine::Error::Archived { .. }) => {
            // A retention policy may take it back between the two: a few tries.
            for _ in 0..3 {
                restore(store, task).await?;
                match engine::commands::retry_as(store, task, actor).await {
                    Err(engine::Error::Archived { .. }) => continue,
                    other => return Ok(other?),
                }
            }
            Err(engine::Error::InvalidInput(format!(
                "task {task} was archived again as soon as it was restored; stop the archiver and retry"
            ))
            .into())
        }
        other => Ok(other?),
    }
}

/// `task`'s history, from the log or, once archived, from its archive: what `replay`,
/// `audit` and the console read. Empty: no such task.
pub async fn history(store: &PgStore, task: TaskId) -> Result<Vec<RecordedEvent>> {
    let events = store.read_stream(task, 1).await?;
    if !events.is_empty() {
        return Ok(events);
    }
    match store.archive_location(task).await? {
        Some(location) => Ok(Archive::read(&location).await?.recorded()?),
        None => Ok(events),
    }
}

/// The audit of `task` as `reel audit TASK` makes it: from the log, or from its archive
/// once archived (an event this build cannot read is reported as it is for the log).
pub async fn audit_task(store: &PgStore, task: TaskId) -> Result<engine::audit::AuditReport> {
    let Some(location) = store.archive_location(task).await? else {
        return Ok(engine::audit::audit_stored(store, task).await?);
    };
    let archived = Archive::read(&location).await?;
    let mut good = Vec::new();
    for stored in &archived.events {
        match stored.decode() {
            Ok(event) => good.push(event),
            Err(unreadable) => return Ok(engine::audit::audit_up_to(task, &good, unreadable)?),
        }
    }
    Ok(audit(task, &good))
}

/// What statistics need of a stream (kept on its row once archived), as `reel stats` and `reel audit --all` counted the stream in the log: up to an event
/// this build cannot read, which is itself a broken invariant.
fn summary(events: &[StoredEvent]) -> serde_json::Value {
    let recorded: Vec<RecordedEvent> = events.iter().map_while(|e| e.decode().ok()).collect();
    let Some(first) = events.first() else {
        return serde_json::Value::Null;
    };
    let unreadable = u32::from(recorded.len() < events.len());
    let report = audit(TaskId::from(first.stream_id), &recorded);
    serde_json::json!({
        "violations": report.violations.len() as u32 + unreadable,
        "spent_micros": report.spent.cost_micros,
        "saved_micros": report.saved.cost_micros,
        "items_run": report.items_run,
        "items_skipped": report.items_skipped,
        "jobs_submitted": report.jobs_submitted,
        "submits_unanswered": report.submits_unanswered,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The object for `events`: gzip of the manifest (its counts and digest filled in) and the
/// event lines. Returns the object and the manifest written.
fn encode(mut manifest: Manifest, events: &[StoredEvent]) -> Result<(Vec<u8>, Manifest)> {
    let mut lines = Vec::new();
    for event in events {
        serde_json::to_writer(&mut lines, event).map_err(engine::Error::from)?;
        lines.push(b'\n');
    }
    manifest.sha256 = hex(&Sha256::digest(&lines));
    manifest.bytes = lines.len() as u64;
    let mut head = serde_json::to_vec(&manifest).map_err(engine::Error::from)?;
    head.push(b'\n');
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let io = |e: std::io::Error| ArchiveError::Target(format!("cannot compress: {e}"));
    gz.write_all(&head).map_err(io)?;
    gz.write_all(&lines).map_err(io)?;
    Ok((gz.finish().map_err(io)?, manifest))
}

/// Reads an object back: a manifest, then exactly its count of event lines whose digest
/// matches, versions 1 to N of its task.
fn decode(location: &str, object: &[u8]) -> Result<ArchivedStream> {
    let corrupt = |reason: String| ArchiveError::Corrupt {
        location: location.to_owned(),
        reason,
    };
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(object)
        .read_to_end(&mut text)
        .map_err(|e| corrupt(format!("not gzip: {e}")))?;
    let split = text
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt("no manifest line".into()))?;
    let manifest: Manifest =
        serde_json::from_slice(&text[..split]).map_err(|e| corrupt(format!("manifest: {e}")))?;
    if manifest.reel_archive != FORMAT {
        return Err(corrupt(format!(
            "format {} (this build reads {FORMAT})",
            manifest.reel_archive
        )));
    }
    let lines = &text[split + 1..];
    if lines.len() as u64 != manifest.bytes || hex(&Sha256::digest(lines)) != manifest.sha256 {
        return Err(corrupt(
            "its events do not match the manifest's size and SHA-256".into(),
        ));
    }
    let events = lines
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(serde_json::from_slice::<StoredEvent>)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| corrupt(format!("an event line: {e}")))?;
    let whole = events.len() as u64 == u64::from(manifest.events)
        && events
            .iter()
            .zip(1..)
            .all(|(e, v)| e.stream_version == v && e.stream_id == manifest.task.as_uuid());
    if !whole {
        return Err(corrupt(format!(
            "it should hold versions 1 to {} of task {}",
            manifest.events, manifest.task
        )));
    }
    Ok(ArchivedStream { manifest, events })
}
