//! Mkdir on the server: policy, then the store creates the directory (and parents) and applies its metadata.

use tracing::info;

use crate::paths::RemotePath;
use crate::protocol::{write_frame, MkdirRequest, RemoteError, Response};

use super::{protocol_error, writable, Ctx};
use crate::exchange::SendHalf;

/// Creates a directory beneath the root and applies its metadata.
pub(super) async fn serve_mkdir(
    req: MkdirRequest,
    ctx: &Ctx,
    send: &mut impl SendHalf,
) -> Result<(), RemoteError> {
    let config = &*ctx.config;
    let path = RemotePath::parse(&req.path, false)?;
    writable(config, || format!("'{path}' was not created"))?;
    config.store.mkdir(&path, req.meta).await?;
    write_frame(send, &Response::MkdirDone)
        .await
        .map_err(|e| protocol_error(&e))?;
    send.finish();
    info!(path = %path, "directory ready");
    Ok(())
}
