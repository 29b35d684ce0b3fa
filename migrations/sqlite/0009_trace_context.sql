-- Tracing (README "Tracing"): the trace context of the request that enqueued an input (W3C headers as JSON),
-- so its run, however often retried and wherever claimed, is a span of the same trace.
ALTER TABLE inputs ADD COLUMN trace_context TEXT;
