-- Double-texting (README "Double-texting"): a session's default multitask strategy, and the strategy each
-- message arrived with (an interrupting or rolling-back message is never taken as an answer).
ALTER TABLE sessions ADD COLUMN multitask_strategy TEXT NOT NULL DEFAULT 'enqueue';
ALTER TABLE inputs ADD COLUMN strategy TEXT NOT NULL DEFAULT 'enqueue';
