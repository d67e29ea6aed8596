//! Mkdir on the server: creates a directory (and parents) beneath the root and applies its metadata.

use quinn::SendStream;
use tracing::info;

use crate::paths::RemotePath;
use crate::protocol::{write_frame, ErrorCode, MkdirRequest, RemoteError, Response};
use crate::transfer::{self, blocking};

use super::put::open_or_create_dir;
use super::{fs_error, protocol_error, ServeConfig};

/// Creates a directory beneath the root and applies its metadata.
pub(super) async fn serve_mkdir(
    req: MkdirRequest,
    config: &ServeConfig,
    send: &mut SendStream,
) -> Result<(), RemoteError> {
    let path = RemotePath::parse(&req.path, false)?;
    if config.read_only {
        return Err(RemoteError::new(
            ErrorCode::ReadOnly,
            format!("'{path}' was not created: this server is read-only"),
        ));
    }
    let root = config.root_dir.clone();
    let p = path.clone();
    blocking(move || -> Result<(), RemoteError> {
        let dir = open_or_create_dir(&root, &p.relative(), &p)?;
        if let Some(meta) = req.meta {
            transfer::apply_dir_meta(&dir, &meta)
                .map_err(|e| fs_error(&e, &p, "cannot set the metadata of"))?;
        }
        Ok(())
    })
    .await?;
    write_frame(send, &Response::MkdirDone)
        .await
        .map_err(|e| protocol_error(&e))?;
    let _ = send.finish();
    info!(path = %path, "directory ready");
    Ok(())
}
