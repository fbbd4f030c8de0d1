-- title: Heads - mean direct logit attribution per block and head
-- Paper: none, beyond the paper (METHOD §3b, experiment 'heads'): how much each attention head of each
-- block writes the true class into the token it updates, through the final norm linearised at
-- the token's residual-stream scale after that block and the head (the class embedding).
-- The block x head heatmap of the report draws it per variant (trained beside its @random twin).
-- Returns one row per variant x block x head x token kind (the CLS where the model has one, and
-- the image tokens; other prefix tokens excluded). Reads head_summary (stored by summary-tier
-- jobs, computed from heads rows otherwise).
-- Columns:
--   variant, block (1..L), head (0..H-1), token_kind ('cls' | 'image'), tokens
--   mean_dla        mean DLA of the true class per token (logit units; > 0 writes the class)
--   share_of_block_pct   this head's share of the block's summed |mean DLA| over heads
WITH per_head AS (
    SELECT variant, block, head, token_kind, sum(tokens)::BIGINT AS tokens, sum(dla_sum) / sum(tokens) AS mean_dla
    FROM head_summary
    WHERE experiment = 'heads' AND token_kind IN ('cls', 'image')
    GROUP BY variant, block, head, token_kind
)
SELECT variant, block, head, token_kind, tokens, mean_dla,
       100 * abs(mean_dla) / nullif(sum(abs(mean_dla)) OVER (PARTITION BY variant, block, token_kind), 0)
           AS share_of_block_pct
FROM per_head
ORDER BY variant, token_kind, block, head
