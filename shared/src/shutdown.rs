//! Graceful shutdown: every service runs until a token is cancelled, and `main` cancels it
//! on SIGINT or SIGTERM.

use tokio_util::sync::CancellationToken;

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        _ = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// A token cancelled by the first SIGINT/SIGTERM.
pub fn token_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        signal().await;
        child.cancel();
    });
    token
}

/// Runs `work` until it ends; once `token` is cancelled it gets `deadline` more to finish.
pub async fn with_deadline<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
    token: CancellationToken,
    deadline: std::time::Duration,
) -> anyhow::Result<T> {
    let expired = async {
        token.cancelled().await;
        tokio::time::sleep(deadline).await;
    };
    tokio::select! {
        result = work => result,
        _ = expired => anyhow::bail!(
            "shutdown deadline of {deadline:?} passed before the work in hand finished; \
             what was not committed is replayed on restart (process.shutdown_deadline_ms)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn work_that_outlives_the_deadline_is_cut_off() {
        let token = CancellationToken::new();
        token.cancel();
        let slow = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        };
        let err = with_deadline(slow, token, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("shutdown deadline"));
        let quick = async { Ok(7) };
        assert_eq!(
            with_deadline(quick, CancellationToken::new(), Duration::ZERO)
                .await
                .unwrap(),
            7
        );
    }
}
