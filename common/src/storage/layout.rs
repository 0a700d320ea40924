//! Every name on storage, built and parsed here and nowhere else (the layout is drawn in
//! `storage/mod.rs`). The names are those every release has written: existing deployments'
//! files must stay readable, so a name is never changed, only added.

use std::path::PathBuf;

use crate::geometry::ChunkIndex;
use crate::id::UploadId;
use crate::upload::{Assembly, ChunkRecord};

/// The directory under the root that holds one directory per upload.
pub(super) const UPLOADS: &str = "uploads";
/// The directory of an upload's chunk copies, in its directory.
pub(super) const CHUNKS: &str = "chunks";
/// The upload's manifest, in its directory.
pub(super) const MANIFEST: &str = "manifest.json";
/// The length of an upload created without one (tus `Upload-Defer-Length`), once declared:
/// the decimal number, in its directory.
pub(super) const LENGTH: &str = "length";

/// What a stored copy holds, named the way storage names it: its place in the upload.
///
/// The chunk protocol stores chunks by index; tus stores segments by the offset they start
/// at. Both live in the upload's `chunks/` directory: a chunk's name starts with a digit, a
/// segment's with `s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Piece {
    /// A chunk of the chunk protocol: `chunks/<index>.<token>`.
    Chunk(ChunkIndex),
    /// A segment of a tus upload starting at this byte offset: `chunks/s<offset>.<token>`.
    Segment(u64),
}

impl Piece {
    /// The piece a counted part of an upload assembled as `assembly` is stored as.
    pub fn of(assembly: &Assembly, part: &ChunkRecord) -> Self {
        match assembly {
            Assembly::Chunks => Self::Chunk(part.index),
            Assembly::Segments { .. } | Assembly::Concat { .. } => Self::Segment(part.offset),
        }
    }
}

impl From<ChunkIndex> for Piece {
    fn from(index: ChunkIndex) -> Self {
        Self::Chunk(index)
    }
}

impl Piece {
    /// The directory, under the upload's, that holds copies of this kind of piece.
    pub(super) fn dir(self) -> &'static str {
        match self {
            Self::Chunk(_) | Self::Segment(_) => CHUNKS,
        }
    }

    /// A complete copy's name: `<index>.<token>`.
    pub(super) fn copy_name(self, token: &str) -> String {
        match self {
            Self::Chunk(index) => format!("{index}.{token}"),
            Self::Segment(offset) => format!("s{offset}.{token}"),
        }
    }

    /// The name of a copy being written: `<index>.<random>.part`.
    pub(super) fn part_name(self, random: &str) -> String {
        match self {
            Self::Chunk(index) => format!("{index}.{random}.part"),
            Self::Segment(offset) => format!("s{offset}.{random}.part"),
        }
    }
}

/// A file in a directory of copies, as [`copy_entry`] reads its name.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum CopyEntry<'a> {
    /// A complete copy of `piece` under its `token`.
    Copy { piece: Piece, token: &'a str },
    /// A `.part` file, or anything else that is not a complete copy.
    Other,
}

/// Reads a name found in the chunk directory.
pub(super) fn copy_entry(name: &str) -> CopyEntry<'_> {
    let Some((place, token)) = name.split_once('.') else {
        return CopyEntry::Other;
    };
    if token.contains('.') || token.is_empty() {
        return CopyEntry::Other;
    }
    // Digits only: `u64::from_str` also takes a leading `+`.
    let number = |digits: &str| {
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u64>().ok())
            .flatten()
    };
    let piece = match place.strip_prefix('s') {
        Some(offset) => number(offset).map(Piece::Segment),
        None => number(place).map(|i| Piece::Chunk(ChunkIndex(i))),
    };
    match piece {
        Some(piece) => CopyEntry::Copy { piece, token },
        None => CopyEntry::Other,
    }
}

/// A copy's token: a random part and the copy's CRC32C (8 hex digits), so that storage alone
/// tells what each complete copy holds.
pub(super) fn copy_token(random: &str, crc32c: u32) -> String {
    format!("{random}{crc32c:08x}")
}

/// The CRC32C a token of the current form carries (16 random + 8 CRC hex digits).
pub(super) fn token_crc(token: &str) -> Option<u32> {
    (token.len() == 24)
        .then(|| u32::from_str_radix(&token[16..], 16).ok())
        .flatten()
}

/// The file of a merge attempt: its merged file, its completion record, or the temporary
/// file of either. Each carries the attempt's fencing token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AttemptFile {
    /// `file.<fence>`: the verified merged file.
    Merged(u64),
    /// `.file.<fence>.<random>.tmp`: a merged file being written.
    MergeTemp(u64),
    /// `completion.<fence>.json`: the completion record.
    Completion(u64),
    /// `.completion.<fence>.<random>.tmp`: a completion record being written.
    CompletionTemp(u64),
}

impl AttemptFile {
    /// Reads a name found in an upload's directory; `None` for anything that is not a merge
    /// attempt's file.
    pub(super) fn parse(name: &str) -> Option<Self> {
        let temp = |rest: &str| -> Option<u64> {
            let (fence, random) = rest.split_once('.')?;
            random.strip_suffix(".tmp")?;
            fence.parse().ok()
        };
        if let Some(fence) = name.strip_prefix("file.") {
            fence.parse().ok().map(Self::Merged)
        } else if let Some(rest) = name.strip_prefix(".file.") {
            temp(rest).map(Self::MergeTemp)
        } else if let Some(rest) = name.strip_prefix("completion.") {
            let fence = rest.strip_suffix(".json")?;
            fence.parse().ok().map(Self::Completion)
        } else if let Some(rest) = name.strip_prefix(".completion.") {
            temp(rest).map(Self::CompletionTemp)
        } else {
            None
        }
    }

    /// The fencing token of the attempt that wrote the file.
    pub(super) fn fence(self) -> u64 {
        match self {
            Self::Merged(f)
            | Self::MergeTemp(f)
            | Self::Completion(f)
            | Self::CompletionTemp(f) => f,
        }
    }
}

/// `file.<fence>`.
pub(super) fn merged_name(fence: u64) -> String {
    format!("file.{fence}")
}

/// `.file.<fence>.<random>.tmp`.
pub(super) fn merge_temp_name(fence: u64, random: &str) -> String {
    format!(".file.{fence}.{random}.tmp")
}

/// `completion.<fence>.json`.
pub(super) fn completion_name(fence: u64) -> String {
    format!("completion.{fence}.json")
}

/// `.completion.<fence>.<random>.tmp`.
pub(super) fn completion_temp_name(fence: u64, random: &str) -> String {
    format!(".completion.{fence}.{random}.tmp")
}

/// `.manifest.<random>.tmp`.
pub(super) fn manifest_temp_name(random: &str) -> String {
    format!(".manifest.{random}.tmp")
}

/// A file of an upload's early assembly ([`crate::concat::prefix`]): the file being
/// assembled from its in-order prefix, or a checkpoint of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PrefixFile {
    /// `.assembly.<random>`: a file being assembled while the chunks arrive.
    Assembly,
    /// `prefix.<offset>.json`: a checkpoint: the assembly's first `offset` bytes are the
    /// file's, with the hashes' state after them.
    Checkpoint(u64),
    /// `.prefix.<offset>.<random>.tmp`: a checkpoint being written.
    CheckpointTemp,
}

impl PrefixFile {
    /// Reads a name found in an upload's directory; `None` for anything else.
    pub(super) fn parse(name: &str) -> Option<Self> {
        if let Some(random) = name.strip_prefix(".assembly.") {
            (!random.is_empty() && !random.contains('.')).then_some(Self::Assembly)
        } else if let Some(rest) = name.strip_prefix("prefix.") {
            let offset = rest.strip_suffix(".json")?;
            (offset.bytes().all(|b| b.is_ascii_digit()))
                .then(|| offset.parse().ok().map(Self::Checkpoint))
                .flatten()
        } else if let Some(rest) = name.strip_prefix(".prefix.") {
            rest.ends_with(".tmp").then_some(Self::CheckpointTemp)
        } else {
            None
        }
    }
}

/// `.assembly.<random>`.
pub(super) fn assembly_name(random: &str) -> String {
    format!(".assembly.{random}")
}

/// `prefix.<offset>.json`.
pub(super) fn checkpoint_name(offset: u64) -> String {
    format!("prefix.{offset}.json")
}

/// `.prefix.<offset>.<random>.tmp`.
pub(super) fn checkpoint_temp_name(offset: u64, random: &str) -> String {
    format!(".prefix.{offset}.{random}.tmp")
}

/// The directory of one upload, relative to the root.
pub(super) fn upload_dir(id: &UploadId) -> PathBuf {
    PathBuf::from(UPLOADS).join(id.as_str())
}

/// A file of an upload's directory as a location: relative to the root, `/`-separated,
/// the form a completion stores.
pub(super) fn location(id: &UploadId, name: &str) -> String {
    format!("{UPLOADS}/{id}/{name}")
}

/// The file name a location ends with (`file.<fence>` for a merged file).
pub(super) fn location_name(location: &str) -> Option<&str> {
    location.rsplit('/').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_as_what_they_were_built_from() {
        let piece = Piece::Chunk(ChunkIndex(12));
        assert_eq!(
            copy_entry(&piece.copy_name("abc")),
            CopyEntry::Copy {
                piece,
                token: "abc"
            }
        );
        assert_eq!(copy_entry(&piece.part_name("abc")), CopyEntry::Other);
        let segment = Piece::Segment(1 << 40);
        assert_eq!(
            copy_entry(&segment.copy_name("abc")),
            CopyEntry::Copy {
                piece: segment,
                token: "abc"
            }
        );
        assert_eq!(copy_entry(&segment.part_name("abc")), CopyEntry::Other);
        for other in ["x.abc", "s.abc", "s+1.abc", "+1.abc", "1.", "sx1.abc"] {
            assert_eq!(copy_entry(other), CopyEntry::Other, "{other}");
        }
        for (name, file) in [
            (merged_name(7), AttemptFile::Merged(7)),
            (merge_temp_name(7, "r"), AttemptFile::MergeTemp(7)),
            (completion_name(7), AttemptFile::Completion(7)),
            (completion_temp_name(7, "r"), AttemptFile::CompletionTemp(7)),
        ] {
            assert_eq!(AttemptFile::parse(&name), Some(file), "{name}");
        }
        for other in [MANIFEST, "file.x", "completion.7.txt", ".file.7", "chunks"] {
            assert_eq!(AttemptFile::parse(other), None, "{other}");
        }
        for (name, file) in [
            (assembly_name("r"), PrefixFile::Assembly),
            (checkpoint_name(1 << 33), PrefixFile::Checkpoint(1 << 33)),
            (checkpoint_temp_name(8, "r"), PrefixFile::CheckpointTemp),
        ] {
            assert_eq!(PrefixFile::parse(&name), Some(file), "{name}");
            assert_eq!(AttemptFile::parse(&name), None, "{name}");
        }
        for other in [
            MANIFEST,
            "file.7",
            "prefix.+1.json",
            "prefix.x.json",
            ".assembly.",
        ] {
            assert_eq!(PrefixFile::parse(other), None, "{other}");
        }
    }

    #[test]
    fn the_names_are_those_existing_deployments_hold() {
        let id = UploadId::parse("u1").unwrap();
        assert_eq!(Piece::Chunk(ChunkIndex(3)).copy_name("t"), "3.t");
        assert_eq!(Piece::Chunk(ChunkIndex(3)).part_name("r"), "3.r.part");
        assert_eq!(Piece::Segment(4096).copy_name("t"), "s4096.t");
        assert_eq!(location(&id, &merged_name(2)), "uploads/u1/file.2");
        assert_eq!(location_name("uploads/u1/file.2"), Some("file.2"));
        assert_eq!(completion_name(2), "completion.2.json");
        assert_eq!(upload_dir(&id), PathBuf::from("uploads/u1"));
    }
}
