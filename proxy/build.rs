//! Build facts for `kache version`: the git commit, the build date, the
//! compiler and the target, passed to the crate as `KACHE_BUILD_*`
//! environment variables.
//!
//! Never fails the build: without git (a source tarball, a container build
//! whose context leaves out `.git`) the commit is `unknown`, unless
//! `KACHE_GIT_COMMIT` names it. The date is `SOURCE_DATE_EPOCH` when set
//! (reproducible builds), else the time this script ran, in UTC.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let workspace = manifest_dir.parent().unwrap_or(&manifest_dir).to_path_buf();

    println!("cargo:rerun-if-env-changed=KACHE_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
    // The sources the binary is built from: an edit there may make the tree
    // dirty (and rebuilds this crate anyway).
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "config",
        "cache/src",
        "cache/Cargo.toml",
        "proxy/src",
        "proxy/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }

    let commit = match std::env::var("KACHE_GIT_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_string(),
        _ => git_commit(&workspace).unwrap_or_else(|| "unknown".to_string()),
    };
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let rustc_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());

    println!("cargo:rustc-env=KACHE_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=KACHE_BUILD_DATE={}", utc_timestamp(epoch));
    println!("cargo:rustc-env=KACHE_BUILD_RUSTC={rustc_version}");
    println!("cargo:rustc-env=KACHE_BUILD_TARGET={target}");
}

/// The short hash of `HEAD`, with `-dirty` when tracked files of the
/// workspace differ from it; `None` without git or outside a checkout of
/// this workspace (a tarball unpacked inside some other repository).
fn git_commit(workspace: &Path) -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        // No optional locks: never hold the index lock while someone commits.
        let out = Command::new("git")
            .arg("--no-optional-locks")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let toplevel = PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    if toplevel.canonicalize().ok()? != workspace.canonicalize().ok()? {
        return None;
    }
    // A new commit or checkout changes one of these: rerun then. Only paths
    // that exist (Cargo reruns on every build for a missing one); the
    // branches' directory, not one branch's file, which a packed ref lacks.
    for name in ["HEAD", "packed-refs", "refs/heads"] {
        if let Some(path) = git(&["rev-parse", "--git-path", name]) {
            let path = workspace.join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    let hash = git(&["rev-parse", "--short", "HEAD"]).filter(|h| !h.is_empty())?;
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_none_or(|s| !s.is_empty());
    Some(if dirty { format!("{hash}-dirty") } else { hash })
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (the proleptic Gregorian calendar,
/// as `date -u` prints it).
fn utc_timestamp(epoch: i64) -> String {
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc_timestamp;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        for (epoch, expected) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_709_251_199, "2024-02-29T23:59:59Z"),
            (4_102_444_800, "2100-01-01T00:00:00Z"),
            (-1, "1969-12-31T23:59:59Z"),
        ] {
            assert_eq!(utc_timestamp(epoch), expected, "{epoch}");
        }
    }
}
