//! Remote management (`qxfer rm`, `qxfer mv`, and the mtime and mode `put --sync` sets on files it leaves alone): policy, then the store acts.

use tracing::info;

use crate::paths::RemotePath;
use crate::protocol::{
    write_frame, ErrorCode, RemoteError, RemoveRequest, RenameRequest, Response, SetMetaRequest,
};

use super::{protocol_error, writable, Ctx};
use crate::exchange::SendHalf;

/// Removes a file or a directory beneath the root.
pub(super) async fn serve_remove(
    req: RemoveRequest,
    ctx: &Ctx,
    send: &mut impl SendHalf,
) -> Result<(), RemoteError> {
    let config = &*ctx.config;
    let path = RemotePath::parse(&req.path, false)?;
    writable(config, || format!("'{path}' was not removed"))?;
    config.store.remove(&path, req.recursive).await?;
    write_frame(send, &Response::Removed)
        .await
        .map_err(|e| protocol_error(&e))?;
    send.finish();
    info!(path = %path, recursive = req.recursive, "removed");
    Ok(())
}

/// Renames a file or a directory beneath the root.
pub(super) async fn serve_rename(
    req: RenameRequest,
    ctx: &Ctx,
    send: &mut impl SendHalf,
) -> Result<(), RemoteError> {
    let config = &*ctx.config;
    let from = RemotePath::parse(&req.from, false)?;
    let to = RemotePath::parse(&req.to, false)?;
    writable(config, || format!("'{from}' was not renamed"))?;
    if to == from {
        return Err(RemoteError::new(
            ErrorCode::InvalidPath,
            format!("cannot rename '{from}' to itself"),
        ));
    }
    if to.components().starts_with(from.components()) {
        return Err(RemoteError::new(
            ErrorCode::InvalidPath,
            format!("cannot rename '{from}' to '{to}': a directory cannot move into itself"),
        ));
    }
    config.store.rename(&from, &to).await?;
    write_frame(send, &Response::Renamed)
        .await
        .map_err(|e| protocol_error(&e))?;
    send.finish();
    info!(from = %from, to = %to, "renamed");
    Ok(())
}

/// Gives a file the client holds the same contents of its copy's mtime
/// and mode (`put --sync` of a file it leaves alone).
pub(super) async fn serve_set_meta(
    req: SetMetaRequest,
    ctx: &Ctx,
    send: &mut impl SendHalf,
) -> Result<(), RemoteError> {
    let (config, client) = (&*ctx.config, ctx.client);
    let path = RemotePath::parse(&req.path, false)?;
    writable(config, || {
        format!("the mtime and mode of '{path}' were not set")
    })?;
    if let Some(max) = config.max_file_size {
        // The object store's way writes the file again.
        if req.meta.size > max {
            return Err(RemoteError::new(
                ErrorCode::TooLarge,
                format!(
                    "'{path}' is {} bytes; this server accepts files of at most {max} bytes",
                    req.meta.size
                ),
            ));
        }
    }
    config
        .store
        .set_meta(&path, req.meta, req.digest, client)
        .await?;
    write_frame(send, &Response::MetaSet)
        .await
        .map_err(|e| protocol_error(&e))?;
    send.finish();
    info!(path = %path, "mtime and mode set");
    Ok(())
}
