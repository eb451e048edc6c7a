-- A fresh `cardsvc seed` writes its `seed_in_progress` row as soon as it has found the registry empty, then
-- computes the e-card key pool (seconds to minutes) and only then drops the indexes and constraints. Killed
-- in between, it left the row on a registry that was whole (and empty), and everything refused it as
-- incomplete until the database was dropped. The row now says whether the drop happened: the seed writes
-- it with `dropped = false` and sets it in the transaction that drops them. A row left with
-- `dropped = false` by a seed that is gone changed nothing: the service starts, and the next seed replaces
-- it. Rows written before this migration keep the old meaning (dropped).
ALTER TABLE seed_in_progress ADD COLUMN dropped boolean NOT NULL DEFAULT true;
