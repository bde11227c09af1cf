//! Response bodies on their way to containerd: the one boxed body type every HTTP path uses, the
//! verified body (length and digest checked, tail held back), and peer blobs on their way to
//! containerd (streamed, with containerd's partial copy discarded if they fail; or verified
//! before sending, buffered in memory or spooled to disk within byte budgets).
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

pub mod budget;
pub mod buffered;
pub mod discard;
pub mod shared;
pub mod spool;
pub mod tee;
pub mod verify;

pub use verify::{BodyCheck, ReadError, VerifiedBody, VerifyError, read_whole};

/// A boxed error, as hyper bodies carry them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A streamed body: of every response, every request handed to a passthrough, and every upstream
/// answer passed through.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;
