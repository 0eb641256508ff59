-- The keys table, quoted (for VACUUM).
{keys}
