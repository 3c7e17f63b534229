//! The SDL: generated, checked in, served, and composable.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;
use ugc_subgraph::graphql;

use crate::support::TestApp;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn checked_in() -> String {
    std::fs::read_to_string(repo_root().join("schema/ugc-subgraph.graphql")).unwrap()
}

#[test]
fn checked_in_sdl_matches_the_code() {
    let generated = graphql::sdl(&graphql::schema_builder().finish());
    assert!(
        generated == checked_in(),
        "schema/ugc-subgraph.graphql is out of date: run `make schema` and commit the result"
    );
}

#[tokio::test]
async fn the_served_sdl_is_the_checked_in_one() {
    let app = TestApp::start().await;
    let body = app.gql("{ _service { sdl } }", json!({})).await;
    assert_eq!(body["data"]["_service"]["sdl"].as_str().unwrap(), checked_in());
}

#[test]
fn the_checked_in_sdl_composes_with_the_offers_subgraph() {
    let out = Command::new("node")
        .arg(repo_root().join("gateway/compose.mjs"))
        .output()
        .expect("node is required (make gateway-deps)");
    assert!(
        out.status.success(),
        "composition failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
