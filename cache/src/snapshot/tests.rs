//! Snapshot files: round trips, damage of every kind rejected without
//! panicking, foreign snapshots refused, atomic replacement, I/O failures.

use std::collections::HashSet;

use super::*;

fn identity(encoding: &str) -> Expectation {
    Expectation {
        upstream_url: "https://127.0.0.1:6443".into(),
        cluster_uid: "0b6c2f8e-5d2a-4a3e-9a7e-6f0f4c1d2e3f".into(),
        group: "apps".into(),
        version: "v1".into(),
        resource: "deployments".into(),
        encoding: encoding.into(),
    }
}

fn json_objects(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"kind":"Deployment","apiVersion":"apps/v1","metadata":{{"name":"d{i}","namespace":"ns","resourceVersion":"{i}"}}}}"#
            )
            .into_bytes()
        })
        .collect()
}

/// Protobuf-like messages: arbitrary binary, zero bytes, 0xff, an empty one.
fn binary_objects() -> Vec<Vec<u8>> {
    vec![
        vec![0x0a, 0x00, 0x12, 0x03, 0xff, 0xfe, 0x00],
        Vec::new(),
        (0..=255u8).collect(),
        vec![0u8; 70_000],
    ]
}

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn round_trip(encoding: &str, objects: &[Vec<u8>]) -> Snapshot {
    let dir = dir();
    let identity = identity(encoding);
    let header = SnapshotHeader::new(&identity, 4242);
    let path = write(dir.path(), &header, objects).unwrap();
    assert_eq!(path, super::path(dir.path(), &identity));
    let snapshot = read(&path, &identity).unwrap();
    assert_eq!(
        snapshot.header,
        SnapshotHeader {
            object_count: objects.len() as u64,
            ..header
        }
    );
    assert_eq!(snapshot.objects.len(), objects.len());
    for (read, written) in snapshot.objects.iter().zip(objects) {
        assert_eq!(read.as_ref(), written.as_slice());
    }
    snapshot
}

/// A small valid file's bytes and the identity it was written for.
fn small_file() -> (Vec<u8>, Expectation) {
    let dir = dir();
    let identity = identity("json");
    let objects: Vec<&[u8]> = vec![b"{\"a\":1}", b"", b"\x00\x01\x02"];
    let path = write(dir.path(), &SnapshotHeader::new(&identity, 7), &objects).unwrap();
    (fs::read(path).unwrap(), identity)
}

fn read_bytes(bytes: &[u8], identity: &Expectation) -> Result<Snapshot, SnapshotError> {
    let dir = dir();
    let path = dir.path().join("x.ksnap");
    fs::write(&path, bytes).unwrap();
    read(&path, identity)
}

#[test]
fn json_objects_and_header_survive_a_round_trip() {
    let snapshot = round_trip("json", &json_objects(3));
    assert_eq!(snapshot.header.resource_version, 4242);
    assert_eq!(snapshot.header.format_version, FORMAT_VERSION);
}

#[test]
fn binary_protobuf_messages_survive_a_round_trip() {
    round_trip("protobuf", &binary_objects());
}

#[test]
fn an_empty_store_survives_a_round_trip() {
    let snapshot = round_trip("json", &[]);
    assert!(snapshot.objects.is_empty());
}

#[test]
fn ten_thousand_objects_survive_a_round_trip() {
    round_trip("json", &json_objects(10_000));
}

#[test]
fn the_payload_is_plain_postcard_between_prefix_and_checksum() {
    let (bytes, identity) = small_file();
    assert_eq!(&bytes[..8], MAGIC);
    assert_eq!(bytes[8..12], FORMAT_VERSION.to_le_bytes());
    let payload = &bytes[12..bytes.len() - 4];
    let (header, objects): (SnapshotHeader, Vec<Vec<u8>>) = postcard::from_bytes(payload).unwrap();
    assert_eq!(header.cluster_uid, identity.cluster_uid);
    assert_eq!(header.object_count, 3);
    assert_eq!(objects, vec![b"{\"a\":1}".to_vec(), Vec::new(), vec![0, 1, 2]]);
    let crc = crc32fast::hash(&bytes[..bytes.len() - 4]);
    assert_eq!(bytes[bytes.len() - 4..], crc.to_le_bytes());
}

#[test]
fn write_stamps_the_format_version_and_object_count() {
    let dir = dir();
    let identity = identity("json");
    let header = SnapshotHeader {
        format_version: 99,
        object_count: 12345,
        ..SnapshotHeader::new(&identity, 1)
    };
    let path = write(dir.path(), &header, &json_objects(2)).unwrap();
    let snapshot = read(&path, &identity).unwrap();
    assert_eq!(snapshot.header.format_version, FORMAT_VERSION);
    assert_eq!(snapshot.header.object_count, 2);
}

#[test]
fn a_file_truncated_at_any_length_is_rejected() {
    let (bytes, identity) = small_file();
    for len in 0..bytes.len() {
        match read_bytes(&bytes[..len], &identity) {
            Err(SnapshotError::Truncated | SnapshotError::Corrupt(_)) => {}
            other => panic!("truncated to {len} of {}: {other:?}", bytes.len()),
        }
    }
}

#[test]
fn any_single_flipped_bit_is_rejected_and_never_taken_for_foreign() {
    let (bytes, identity) = small_file();
    for bit in 0..bytes.len() * 8 {
        let mut damaged = bytes.clone();
        damaged[bit / 8] ^= 1 << (bit % 8);
        match read_bytes(&damaged, &identity) {
            Err(SnapshotError::Truncated | SnapshotError::Corrupt(_) | SnapshotError::Format { .. }) => {}
            other => panic!("bit {bit} flipped: {other:?}"),
        }
    }
}

/// xorshift64*: deterministic, dependency-free randomness for the fuzz test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_damage_never_panics_and_never_reads_as_valid() {
    let (bytes, identity) = small_file();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..3_000 {
        let mut damaged = bytes.clone();
        match round % 4 {
            // A few flipped bytes.
            0 => {
                for _ in 0..=rng.below(4) {
                    let i = rng.below(damaged.len());
                    damaged[i] ^= 1 + rng.below(255) as u8;
                }
            }
            // Truncated, then damaged.
            1 => {
                damaged.truncate(rng.below(bytes.len()));
                if !damaged.is_empty() {
                    let i = rng.below(damaged.len());
                    damaged[i] ^= 0x80;
                }
            }
            // Garbage appended.
            2 => damaged.extend((0..=rng.below(16)).map(|_| rng.next() as u8)),
            // A valid prefix followed by garbage of the original length.
            _ => {
                for byte in &mut damaged[12 + rng.below(bytes.len() - 12)..] {
                    *byte = rng.next() as u8;
                }
            }
        }
        if damaged == bytes {
            continue;
        }
        let result = std::panic::catch_unwind(|| read_bytes(&damaged, &identity));
        match result {
            Ok(Err(_)) => {}
            Ok(Ok(_)) => panic!("round {round}: damaged file read as valid: {damaged:?}"),
            Err(_) => panic!("round {round}: read panicked on {damaged:?}"),
        }
    }
}

#[test]
fn huge_lengths_in_a_damaged_header_are_errors_not_allocations() {
    let (bytes, identity) = small_file();
    // The payload opens with the format version (one byte), then the
    // upstream URL's length (one byte): make that a varint claiming 2^63.
    assert_eq!(bytes[13] as usize, identity.upstream_url.len());
    let mut damaged = bytes[..13].to_vec();
    damaged.extend([0x80; 9]);
    damaged.push(0x01);
    damaged.extend_from_slice(&bytes[14..]);
    assert!(read_bytes(&damaged, &identity).is_err());
}

#[test]
fn snapshots_of_another_cluster_upstream_resource_or_encoding_are_foreign() {
    let (bytes, identity) = small_file();
    type Change = fn(&mut Expectation);
    let cases: [(&str, Change); 6] = [
        ("cluster", |e| e.cluster_uid = "another-uid".into()),
        ("upstream", |e| e.upstream_url = "https://elsewhere:6443".into()),
        ("group", |e| e.group = "extensions".into()),
        ("version", |e| e.version = "v1beta1".into()),
        ("resource", |e| e.resource = "replicasets".into()),
        ("encoding", |e| e.encoding = "protobuf".into()),
    ];
    for (expected_what, change) in cases {
        let mut expect = identity.clone();
        change(&mut expect);
        match read_bytes(&bytes, &expect) {
            Err(SnapshotError::Foreign { what, .. }) => assert_eq!(what, expected_what),
            other => panic!("{expected_what}: {other:?}"),
        }
    }
}

#[test]
fn older_and_newer_format_versions_are_format_errors() {
    let (bytes, identity) = small_file();
    for version in [0, FORMAT_VERSION + 1, u32::MAX] {
        let mut other = bytes.clone();
        other[8..12].copy_from_slice(&version.to_le_bytes());
        match read_bytes(&other, &identity) {
            Err(SnapshotError::Format { found, expected }) => {
                assert_eq!((found, expected), (version, FORMAT_VERSION));
            }
            other => panic!("version {version}: {other:?}"),
        }
    }
}

#[test]
fn a_file_of_another_kind_is_corrupt() {
    let identity = identity("json");
    for bytes in [
        &b"{\"kind\":\"PodList\"}"[..],
        b"KACHESNAPSHOT",
        b"\x00\x00\x00\x00",
    ] {
        assert!(matches!(
            read_bytes(bytes, &identity),
            Err(SnapshotError::Corrupt(_))
        ));
    }
}

#[test]
fn a_missing_file_is_a_not_found_io_error() {
    let dir = dir();
    match read(&dir.path().join("none.ksnap"), &identity("json")) {
        Err(SnapshotError::Io { source, .. }) => assert_eq!(source.kind(), io::ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
}

#[test]
fn writing_under_a_regular_file_is_an_io_error() {
    let dir = dir();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"").unwrap();
    let header = SnapshotHeader::new(&identity("json"), 1);
    let result = write(&file.join("state"), &header, &json_objects(1));
    assert!(matches!(result, Err(SnapshotError::Io { .. })), "{result:?}");
}

#[cfg(unix)]
#[test]
fn writing_into_a_read_only_directory_is_an_io_error_and_leaves_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = dir();
    let state = dir.path().join("state");
    fs::create_dir(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o555)).unwrap();
    // Root ignores permissions: then there is nothing to observe here
    // (writing_under_a_regular_file_is_an_io_error covers the error path).
    let privileged = fs::write(state.join("probe"), b"").is_ok();
    if !privileged {
        let header = SnapshotHeader::new(&identity("json"), 1);
        let result = write(&state, &header, &json_objects(1));
        assert!(matches!(result, Err(SnapshotError::Io { .. })), "{result:?}");
        assert_eq!(fs::read_dir(&state).unwrap().count(), 0);
    }
    fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
}

#[cfg(unix)]
#[test]
fn snapshot_files_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = dir();
    let path = write(
        dir.path(),
        &SnapshotHeader::new(&identity("json"), 1),
        &json_objects(1),
    )
    .unwrap();
    assert_eq!(fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_leftover_temporary_file_of_a_crashed_write_is_ignored() {
    let dir = dir();
    let identity = identity("json");
    let path = write(dir.path(), &SnapshotHeader::new(&identity, 1), &json_objects(2)).unwrap();
    // A crash mid-write: half a new snapshot under a temporary name.
    let name = path.file_name().unwrap().to_str().unwrap();
    let (bytes, _) = small_file();
    fs::write(dir.path().join(temp_name(name)), &bytes[..bytes.len() / 2]).unwrap();

    assert_eq!(list(dir.path()), vec![path.clone()]);
    assert_eq!(read(&path, &identity).unwrap().objects.len(), 2);
    assert_eq!(remove_temporaries(dir.path()).unwrap(), 1);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_new_snapshot_replaces_the_old_one_whole() {
    let dir = dir();
    let identity = identity("json");
    write(dir.path(), &SnapshotHeader::new(&identity, 1), &json_objects(5)).unwrap();
    let path = write(dir.path(), &SnapshotHeader::new(&identity, 2), &json_objects(3)).unwrap();
    let snapshot = read(&path, &identity).unwrap();
    assert_eq!((snapshot.header.resource_version, snapshot.objects.len()), (2, 3));
    assert_eq!(list(dir.path()), vec![path]);
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file remains"
    );
}

#[test]
fn list_finds_one_file_per_store_and_remove_deletes_it() {
    let dir = dir();
    let json = write(
        dir.path(),
        &SnapshotHeader::new(&identity("json"), 1),
        &json_objects(1),
    )
    .unwrap();
    let protobuf = write(
        dir.path(),
        &SnapshotHeader::new(&identity("protobuf"), 1),
        &binary_objects(),
    )
    .unwrap();
    fs::write(dir.path().join("README"), b"not a snapshot").unwrap();
    assert_eq!(list(dir.path()), vec![json.clone(), protobuf.clone()]);
    remove(&json).unwrap();
    remove(&json).unwrap();
    assert_eq!(list(dir.path()), vec![protobuf]);
    assert!(list(&dir.path().join("missing")).is_empty());
}

#[test]
fn file_names_are_distinct_and_safe_for_any_group_and_resource() {
    let long = "x".repeat(300);
    let cases = [
        ("", "v1", "pods", "json"),
        ("", "v1", "pods", "protobuf"),
        ("apps", "v1", "deployments", "json"),
        ("core", "v1", "pods", "json"),
        ("a_b", "v1", "c", "json"),
        ("a", "b_v1", "c", "json"),
        ("..", "..", "..", "json"),
        ("a/b", "v1", "../../etc", "json"),
        ("Example.COM", "v1", "Widgets", "json"),
        ("example.com", "v1", "widgets", "json"),
        ("%41", "v1", "x", "json"),
        ("A", "v1", "x", "json"),
        ("ünïcode.example", "v1", "thîngs", "json"),
        (long.as_str(), "v1", "a", "json"),
        (long.as_str(), "v1", "b", "json"),
    ];
    let mut seen = HashSet::new();
    for (group, version, resource, encoding) in cases {
        let name = file_name(group, version, resource, encoding);
        assert!(name.ends_with(SUFFIX), "{name}");
        assert!(name.len() + 40 < 255, "{name} leaves room for the temporary name");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._%~ABCDEF".contains(&b)),
            "{name}"
        );
        assert!(seen.insert(name.clone()), "{name} is not unique");
    }
    assert_eq!(file_name("", "v1", "pods", "json"), "_v1_pods_json.ksnap");
    assert_eq!(
        file_name("apps", "v1", "deployments", "protobuf"),
        "apps_v1_deployments_protobuf.ksnap"
    );
}

#[test]
fn stores_with_hard_names_round_trip_in_one_directory() {
    let dir = dir();
    let mut expect = identity("json");
    expect.group = "a/b".into();
    expect.resource = "..".into();
    let path = write(dir.path(), &SnapshotHeader::new(&expect, 3), &json_objects(1)).unwrap();
    assert_eq!(path.parent(), Some(dir.path()));
    assert_eq!(read(&path, &expect).unwrap().header.resource, "..");
}
