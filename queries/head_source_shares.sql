-- title: Heads - where the attention reads the class from (source shares by token label)
-- Paper: none, beyond the paper (METHOD §3b source attribution, experiment 'heads'): each head's direct
-- logit attribution at a target token splits over the source tokens it attends to,
-- a(t, s) v(s) through the head's output columns and the linearised final norm. Summed over
-- heads, per block and target kind: the share of the class written into CLS / image tokens that
-- comes from class-labelled, context-labelled, prefix (CLS, registers) and ignored sources.
-- Returns one row per variant x block x target kind x source label.
-- Columns:
--   variant, block (1..L), target_kind ('cls' | 'image'), source_label
--   targets         target tokens (summed over images)
--   dla_share_pct   signed share: this label's summed source terms / all sources' (can be < 0 or > 100
--                   when sources of the other label write against the class)
--   abs_share_pct   share of the summed |source term| (how much is read, either sign)
WITH grouped AS (
    SELECT variant, block, target_kind, source_label,
           sum(targets) FILTER (WHERE head = 0)::BIGINT AS targets,
           sum(dla_sum) AS dla, sum(abs_sum) AS absolute
    FROM head_sources
    WHERE experiment = 'heads' AND target_kind IN ('cls', 'image')
    GROUP BY variant, block, target_kind, source_label
)
SELECT variant, block, target_kind, source_label, targets,
       100 * dla / nullif(sum(dla) OVER (PARTITION BY variant, block, target_kind), 0) AS dla_share_pct,
       100 * absolute / nullif(sum(absolute) OVER (PARTITION BY variant, block, target_kind), 0) AS abs_share_pct
FROM grouped
ORDER BY variant, target_kind, block, source_label
