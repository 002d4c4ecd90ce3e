//! The status table in the docs is rendered from the engine's lifecycle statuses and the
//! video workflow's step statuses (as the workflow declares them): they cannot drift apart
//! (seed scenario 8: "final_review", never "awaiting_review").

use engine::TaskStatus;

const BEGIN: &str = "<!-- status-table:begin";
const END: &str = "<!-- status-table:end -->";

fn rendered() -> String {
    let mut table = String::from("| storage name | shown as (Notion) | meaning |\n|---|---|---|\n");
    let mut row = |storage: &str, shown: &str, meaning: &str| {
        table.push_str(&format!("| `{storage}` | {shown} | {meaning} |\n"));
    };
    let lifecycle = |status: TaskStatus| {
        (
            status.as_str(),
            status.default_display(),
            status.lifecycle_description().unwrap_or_default(),
        )
    };
    let (storage, shown, meaning) = lifecycle(TaskStatus::QUEUED);
    row(storage, &shown, meaning);
    let video = steps::simulated_video_workflow("artifacts", 1.0);
    for step in video.steps() {
        let status = step.step_status();
        let meaning = format!("the video workflow's `{}` step runs", step.name());
        row(status.status.as_str(), &status.display, &meaning);
    }
    for status in &TaskStatus::LIFECYCLE[1..] {
        let (storage, shown, meaning) = lifecycle(*status);
        row(storage, &shown, meaning);
    }
    table
}

fn table_in(doc: &str) -> Option<String> {
    let start = doc.find(BEGIN)?;
    let body = &doc[start..];
    let body = &body[body.find('\n')? + 1..];
    Some(body[..body.find(END)?].to_owned())
}

#[test]
fn the_readme_status_table_matches_the_enum() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let table = table_in(&readme).expect("README.md has a status table between the markers");
    assert_eq!(
        table,
        rendered(),
        "regenerate the README status table from the lifecycle and the video workflow"
    );
}

#[test]
fn no_doc_calls_the_review_status_awaiting_review() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let table = table_in(&readme).expect("table");
    assert!(!table.contains("awaiting_review") && !table.contains("Awaiting Review"));
    assert!(table.contains("| `final_review` | Final Review |"));
}
