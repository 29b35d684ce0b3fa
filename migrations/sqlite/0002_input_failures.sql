-- Failed attempts, counted apart from attempts: an interrupted run (shutdown, crash) is not a failure, and must
-- not use up the retries of one that fails (RetryPolicy.max_attempts applies to failures).
ALTER TABLE inputs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
