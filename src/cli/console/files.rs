//! A task's artifacts (`reel console --artifacts DIR`): images, audio and video shown on its
//! page, served from `<DIR>/<channel>/<task>/<step>/<file>` and nowhere else.
//!
//! The path comes from the URL, so it is checked as the workers' own paths are
//! ([`steps::artifact_path`]: one plain component each for the step and the file), and once
//! resolved (symlinks followed) it must still lie inside that task's directory. Only media
//! and text are served, each with a sandboxing Content-Security-Policy and `nosniff`: a
//! file a provider returned never runs as a page of the console's origin.

use std::path::Path as FsPath;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use engine::{ChannelId, TaskId};
use tower::ServiceExt;
use tower_http::services::ServeFile;

use super::Console;
use super::pages::{page_error, store_error, task_id};

/// How a page shows an artifact, by its file's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Media {
    Image,
    Audio,
    Video,
    /// Served, shown as a link.
    Text,
}

impl Media {
    pub(crate) fn of(file: &str) -> Option<Media> {
        let extension = FsPath::new(file)
            .extension()?
            .to_str()?
            .to_ascii_lowercase();
        Some(match extension.as_str() {
            "png" | "jpg" | "jpeg" | "webp" | "gif" => Media::Image,
            "mp3" | "wav" | "ogg" | "m4a" | "flac" => Media::Audio,
            "mp4" | "webm" | "mov" => Media::Video,
            "txt" | "json" => Media::Text,
            _ => return None,
        })
    }
}

/// An item's recorded artifact (`<channel>/<task>/<step>/<file>`) as the console's URL for
/// it, if it is a file of this task that the console serves.
pub(crate) fn artifact_url(task: TaskId, channel: &str, artifact: &str) -> Option<(String, Media)> {
    let parts: Vec<&str> = artifact.split('/').collect();
    let [in_channel, in_task, step, file] = parts.as_slice() else {
        return None;
    };
    if *in_channel != channel || *in_task != task.to_string() {
        return None;
    }
    let media = Media::of(file)?;
    let url = format!(
        "/tasks/{task}/files/{}/{}",
        super::pages::urlencode(step),
        super::pages::urlencode(file)
    );
    Some((url, media))
}

fn not_found() -> Response {
    page_error(StatusCode::NOT_FOUND, "No such artifact.")
}

/// The file, opened, if what was opened lies inside the task's directory: the check is
/// made on the open file itself (its path as the kernel resolved it), so a symlink swapped
/// in after the check cannot redirect what is served. `root` is canonical, and the
/// channel's and task's directories are taken by name: a task directory that is itself a
/// symlink leads outside, and is refused.
fn open_contained(
    root: &FsPath,
    channel: &ChannelId,
    task: TaskId,
    step: &str,
    file: &str,
) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = steps::artifact_path(root, channel, task, step, file).ok()?;
    let dir = root.join(channel.as_str()).join(task.to_string());
    let opened = std::fs::File::open(&path).ok()?;
    if !opened.metadata().ok()?.is_file() {
        return None;
    }
    let real = std::fs::read_link(format!("/proc/self/fd/{}", opened.as_raw_fd())).ok()?;
    real.starts_with(&dir).then_some(opened)
}

/// `GET /tasks/{id}/files/{step}/{file}`: one artifact of a task the console may show (Range
/// requests answered, so video seeks).
pub(crate) async fn artifact(
    State(console): State<Arc<Console>>,
    Path((raw, step, file)): Path<(String, String, String)>,
    request: Request,
) -> Response {
    let Some(root) = console.artifacts.clone() else {
        return not_found();
    };
    let task = match task_id(&raw) {
        Ok(task) => task,
        Err(response) => return *response,
    };
    let row = match console.store.tasks_by_id(&[task]).await {
        Ok(mut rows) => rows.pop(),
        Err(err) => return store_error(&err),
    };
    let Some(row) = row.filter(|r| console.sees(&r.channel_id)) else {
        return not_found();
    };
    let Ok(channel) = ChannelId::parse(&row.channel_id) else {
        return not_found();
    };
    if Media::of(&file).is_none() {
        return not_found();
    }
    // The type the page asked for (an allowed media type), whatever the file's own name.
    let mime = mime_guess::from_path(&file).first_or_octet_stream();
    let found =
        tokio::task::spawn_blocking(move || open_contained(&root, &channel, task, &step, &file))
            .await
            .ok()
            .flatten();
    let Some(opened) = found else {
        return not_found();
    };
    // Served through the open file: its `/proc/self/fd` link reopens that very file (Range
    // requests answered by tower-http), whatever the directory holds by now.
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&opened));
    let response = match ServeFile::new_with_mime(path, &mime).oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    drop(opened);
    let (mut parts, body) = response.into_parts();
    let headers = &mut parts.headers;
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; media-src 'self'; img-src 'self'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    Response::from_parts(parts, Body::new(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_tasks_media_get_a_url() {
        let task = TaskId::new();
        let other = TaskId::new();
        let url = |artifact: &str| artifact_url(task, "history", artifact);
        assert_eq!(
            url(&format!("history/{task}/video/07.mp4")),
            Some((format!("/tasks/{task}/files/video/07.mp4"), Media::Video))
        );
        assert_eq!(
            url(&format!("history/{task}/assets/01.PNG")).map(|u| u.1),
            Some(Media::Image)
        );
        for refused in [
            format!("other/{task}/video/07.mp4"),
            format!("history/{other}/video/07.mp4"),
            format!("history/{task}/video/07.html"),
            format!("history/{task}/video/x/07.mp4"),
            format!("history/{task}/07.mp4"),
            "a-text-artifact".to_owned(),
            String::new(),
        ] {
            assert_eq!(url(&refused), None, "{refused}");
        }
    }
}
