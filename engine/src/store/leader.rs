//! Leadership by lease rows (`leader_leases`): one holder at a time per name, renewed by
//! taking it again, taken by anyone once it has expired (a holder that died). For work that
//! must run on one process of a fleet at a time, such as the background archiver.

use std::time::Duration;

use super::PgStore;
use crate::error::Result;

const TAKE_SQL: &str = "INSERT INTO leader_leases AS l (name, holder, expires_at) \
     VALUES ($1, $2, now() + make_interval(secs => $3)) \
     ON CONFLICT (name) DO UPDATE \
        SET holder = excluded.holder, expires_at = excluded.expires_at \
      WHERE l.expires_at < now() OR l.holder = excluded.holder \
     RETURNING holder";

impl PgStore {
    /// Takes (or keeps) the lead of `name` for `holder` until `ttl` from now, by the
    /// database's clock. False: another holder has it.
    pub async fn take_lead(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let taken: Option<String> = self
            .on_pool(async |c| {
                self.scalar(TAKE_SQL)
                    .bind(name)
                    .bind(holder)
                    .bind(ttl.as_secs_f64())
                    .fetch_optional(c)
                    .await
            })
            .await?;
        Ok(taken.is_some())
    }

    /// Gives up the lead of `name` if `holder` has it.
    pub async fn release_lead(&self, name: &str, holder: &str) -> Result<()> {
        self.on_pool(async |c| {
            self.statement("DELETE FROM leader_leases WHERE name = $1 AND holder = $2")
                .bind(name)
                .bind(holder)
                .execute(c)
                .await
        })
        .await?;
        Ok(())
    }
}
