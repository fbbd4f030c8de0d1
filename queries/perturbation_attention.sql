-- title: Attention perturbation - last-block identifiability with restricted attention
-- Paper: Section 5 attention-perturbation table (image tokens attend only to themselves:
-- B/32 60.73 % -> 0.12 %; image tokens do not attend to [CLS]: unchanged).
-- Returns one row per variant; image tokens, residual stream, last block.
-- Columns:
--   variant
--   baseline_pct   % identifiable image tokens, unperturbed model (experiment 'baseline')
--   self_only_pct  the same with experiment 'attn_self_only' (null if not run)
--   no_cls_pct     the same with experiment 'attn_no_cls' (null if not run, e.g. GAP models)
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant
)
SELECT t.variant,
       100 * sum(CASE WHEN t.experiment = 'baseline' THEN t.identifiable END)
           / sum(CASE WHEN t.experiment = 'baseline' THEN t.tokens END) AS baseline_pct,
       100 * sum(CASE WHEN t.experiment = 'attn_self_only' THEN t.identifiable END)
           / sum(CASE WHEN t.experiment = 'attn_self_only' THEN t.tokens END) AS self_only_pct,
       100 * sum(CASE WHEN t.experiment = 'attn_no_cls' THEN t.identifiable END)
           / sum(CASE WHEN t.experiment = 'attn_no_cls' THEN t.tokens END) AS no_cls_pct
FROM token_summary t JOIN depth d ON t.variant = d.variant AND t.block = d.depth
WHERE t.stream = 'resid' AND t.token_kind = 'image'
  AND t.experiment IN ('baseline', 'attn_self_only', 'attn_no_cls')
GROUP BY t.variant
ORDER BY t.variant
