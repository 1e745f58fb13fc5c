-- The attempt during which a signal or an update last arrived while it ran: a completion
-- of that attempt looks whether it left one unhandled (the common case, none, costs no
-- read).
ALTER TABLE invocations ADD COLUMN arrived_during_attempt BIGINT;
