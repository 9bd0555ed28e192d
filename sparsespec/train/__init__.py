"""BudgetDraft training: a drafter robust to its KV budget (issue #5)."""
