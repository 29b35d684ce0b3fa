-- Answers belong to their run (README "Guarantees"): a queued message taken as the answer to a human-input
-- request is marked done and bound to the input whose run asked (answer_for = that input's id), so every later
-- attempt of that input gets the same answers in the same order.
ALTER TABLE inputs ADD COLUMN answer_for BIGINT REFERENCES inputs (id) ON DELETE CASCADE;
CREATE INDEX inputs_answer_for ON inputs (answer_for, id) WHERE answer_for IS NOT NULL;
-- Deaths of the process while running this input (lease recovery), apart from failures and graceful
-- shutdowns: at max_interruptions the input ends with a final run_failed instead of being re-queued forever.
ALTER TABLE inputs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;
