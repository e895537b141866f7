-- The story of every study, one row each (PostgreSQL): what arrived from whom and when,
-- which model processed it, what it found, what Pleura produced and where it went.
-- Run:  psql "$DATABASE" -f docs/audit/study_story.sql
SELECT
  s.study_instance_uid,
  s.state,
  (SELECT min(i.received_at) FROM instances i WHERE i.study_id = s.id) AS first_instance_received,
  (SELECT max(i.received_at) FROM instances i WHERE i.study_id = s.id) AS last_instance_received,
  (SELECT string_agg(DISTINCT a.calling_ae || '@' || a.peer_host, ', ')
     FROM instances i JOIN associations a ON a.id = i.association_id
    WHERE i.study_id = s.id) AS calling_ae,
  j.bundle_name AS model,
  j.bundle_version AS model_version,
  j.backend,
  j.attempts AS processing_attempts,
  (SELECT string_agg(f.finding || '=' || round(f.probability::numeric, 3)
                     || CASE WHEN f.positive THEN ' (positive)' ELSE '' END,
                     ', ' ORDER BY f.instance_id, f.finding)
     FROM findings f WHERE f.job_id = j.id) AS findings,
  (SELECT string_agg(o.sop_instance_uid, ', ') FROM output_objects o
    WHERE o.job_id = j.id AND o.kind = 'SR') AS sr_uids,
  (SELECT string_agg(o.sop_instance_uid, ', ' ORDER BY o.sop_instance_uid) FROM output_objects o
    WHERE o.job_id = j.id AND o.kind = 'SC') AS sc_uids,
  (SELECT string_agg(d.destination || ' ' || d.state || ' x' || d.cnt, ', ')
     FROM (SELECT d.destination, d.state, count(*) AS cnt
             FROM deliveries d JOIN output_objects o ON o.id = d.output_object_id
            WHERE o.job_id = j.id GROUP BY d.destination, d.state) d) AS delivery_status,
  (SELECT max(d.delivered_at) FROM deliveries d JOIN output_objects o ON o.id = d.output_object_id
    WHERE o.job_id = j.id) AS last_delivered_at,
  (SELECT max(d.delivered_at) FROM deliveries d JOIN output_objects o ON o.id = d.output_object_id
    WHERE o.job_id = j.id)
    - (SELECT max(i.received_at) FROM instances i WHERE i.study_id = s.id) AS time_to_result
FROM studies s
LEFT JOIN LATERAL (
  SELECT * FROM jobs WHERE jobs.study_id = s.id AND jobs.state = 'SUCCEEDED'
  ORDER BY jobs.revision DESC LIMIT 1
) j ON true
ORDER BY s.last_received_at DESC;
