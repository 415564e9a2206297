//! Records the commit the binaries are built from, for `fhirgw_build_info{commit}`: `FHIRGW_BUILD_COMMIT` when set
//! (the Docker build passes it, as the build context has no `.git`), else `git rev-parse HEAD`, else `unknown`.

use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").current_dir(dir).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=FHIRGW_BUILD_COMMIT");
    let given = std::env::var("FHIRGW_BUILD_COMMIT").ok().map(|c| c.trim().to_owned()).filter(|c| !c.is_empty());
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_owned());
    let dir = Path::new(&dir);
    let commit = given.or_else(|| {
        let commit = git(dir, &["rev-parse", "HEAD"])?;
        // Build again when HEAD moves: HEAD itself, the branch it names and packed refs (in a worktree these live in
        // different directories, so git says where).
        let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
        watched.extend(git(dir, &["symbolic-ref", "-q", "HEAD"]));
        for name in watched {
            // A missing file would make Cargo run this script (and rebuild both planes) on every build.
            if let Some(path) = git(dir, &["rev-parse", "--path-format=absolute", "--git-path", &name])
                .filter(|p| Path::new(p).exists())
            {
                println!("cargo:rerun-if-changed={path}");
            }
        }
        Some(commit)
    });
    // Only what a label value may hold, whatever the variable contained.
    let commit: String = commit
        .unwrap_or_else(|| "unknown".to_owned())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
        .take(64)
        .collect();
    let commit = if commit.is_empty() { "unknown".to_owned() } else { commit };
    println!("cargo:rustc-env=FHIRGW_BUILD_COMMIT={commit}");
}
