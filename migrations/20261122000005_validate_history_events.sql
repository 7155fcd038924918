-- Validate the widened history check added NOT VALID in the previous
-- migration; VALIDATE takes only a SHARE UPDATE EXCLUSIVE lock (writes go on).
-- Rollback: nothing to undo.
set local lock_timeout = '5s';
set local statement_timeout = '10min';
alter table history validate constraint history_event_check;
